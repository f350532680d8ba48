"""Lazy package exports: a subpackage lists its public names, and each loads its module on first use, so
importing one light module (e.g. `drpruning.pruning.masks`) does not pull in Composer."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, public: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any],
                                                                     Callable[[], list[str]]]:
    """`(__all__, __getattr__, __dir__)` for `package`, whose `public` maps each exported name to the
    submodule that defines it. The package's `TYPE_CHECKING` imports name the same things for type
    checkers and IDEs."""

    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(f"{package}.{public[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    names = sorted(public)

    def __dir__() -> list[str]:
        module = importlib.import_module(package)
        return sorted(set(vars(module)) | set(names))

    return names, __getattr__, __dir__
