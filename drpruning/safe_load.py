"""Read pickled files without running code from them.

A Composer checkpoint, an importance cache and a sharded checkpoint's `.metadata` are pickles: loaded with
`torch.load(weights_only=False)` or `pickle.load`, a crafted one runs any command it names. Everything the
project loads goes through here instead: `torch.load(weights_only=True)` with an explicit allow-list of
the few non-tensor types Composer checkpoints hold (numpy arrays in RNG and scheduler state, a
`timedelta` in the timestamp, torch's version string), and a restricted unpickler for plain pickles. A file
that names anything else is refused in one line that names the file and what it asked for.

Composer's own resume (`autoresume`, `load_path`) reads with `weights_only=False`; `scripts/train.py`
first reads that checkpoint here (memory-mapped, so the tensors are not read), so a crafted file is
refused before Composer sees it.
"""

from __future__ import annotations

import datetime
import importlib
import io
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drpruning.errors import UnsafeFileError


def _numpy_globals() -> list[Any]:
    """numpy's array-rebuilding function under both of its module names, the array and dtype classes."""
    found: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():  # numpy 2 warns on its old module name
                warnings.simplefilter("ignore")
                found.append(importlib.import_module(module)._reconstruct)
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


def allowed_globals() -> list[Any]:
    """What a Composer checkpoint of a drpruning run may name beyond torch's own weights-only set."""
    return [*_numpy_globals(), datetime.timedelta, torch.torch_version.TorchVersion]


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_torch_file(path: str | Path | io.BytesIO, what: str, *, mmap: bool = False, name: str | None = None) -> Any:
    """`torch.load` of a file that may come from anyone: never runs code.

    Raises `UnsafeFileError` naming the file and the global it asked for when the pickle names anything
    off the allow-list, and `ValueError` (with the file's name) when it is not a readable torch file.
    `name` words the errors for an in-memory file."""
    if not isinstance(path, io.BytesIO):
        path = Path(path)
    shown = name or str(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch words every refusal as a weights_only failure; a named global is what marks a crafted file.
        names = sorted(set(unsafe_globals(path)) | set(_UNSUPPORTED_GLOBAL.findall(str(error))))
        if names:
            raise UnsafeFileError(f"refusing to load {shown} as {what}: it names {', '.join(names)}, which {what} "
                                  "never holds (a crafted or foreign file; loading it could run code)") from None
        raise ValueError(f"cannot read {shown} as {what} (truncated, or not a torch.save file): "
                         f"{_describe(error)}") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"cannot read {shown} as {what} (truncated, or not a torch.save file): "
                         f"{_describe(error)}") from None  # fmt: skip


def unsafe_globals(path: str | Path | io.BytesIO) -> list[str]:
    """The globals a torch file's pickle names beyond torch's weights-only set and `allowed_globals()`."""
    try:
        if isinstance(path, io.BytesIO):
            path.seek(0)
        with torch.serialization.safe_globals(allowed_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to word an error about a file already refused
        return []


# A sharded checkpoint's `.metadata` holds torch.distributed.checkpoint's own dataclasses, sizes and dtypes.
DCP_METADATA_PREFIXES = ("torch.distributed.checkpoint.metadata.", "torch.distributed.checkpoint.planner.",
                         "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.Size",
                         "torch.serialization._get_layout", "collections.OrderedDict", "builtins.set",
                         "builtins.frozenset", "pathlib.PosixPath", "pathlib.PurePosixPath")


def _is_torch_constant(module: str, name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format: values, not callables."""
    value = getattr(torch, name, None) if module == "torch" else None
    return isinstance(value, torch.dtype | torch.layout | torch.memory_format)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, allowed_prefixes: tuple[str, ...], name: str):
        super().__init__(file)
        self.allowed_prefixes, self.name = allowed_prefixes, name

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if not (qualified.startswith(self.allowed_prefixes) or _is_torch_constant(module, name)):
            raise UnsafeFileError(f"refusing to load {self.name}: it names {qualified}, which it never holds "
                                  "(a crafted or foreign file; loading it could run code)")  # fmt: skip
        return super().find_class(module, name)


def load_pickle(path: str | Path, allowed_prefixes: Iterable[str]) -> Any:
    """`pickle.load` that resolves only globals under `allowed_prefixes` (module paths or qualified names)
    and torch's dtype / layout / memory-format constants."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            return _RestrictedUnpickler(handle, tuple(allowed_prefixes), str(path)).load()
        except UnsafeFileError:
            raise
        except Exception as error:  # noqa: BLE001 - pickle raises many types for truncated / foreign files
            raise ValueError(f"cannot read {path}: {_describe(error)}") from None


def load_sharded_keys(checkpoint: Path, keys: set[str]) -> dict[str, Any]:
    """The chosen top-level keys of a torch.distributed.checkpoint folder, without running code from it.

    torch's own readers unpickle `.metadata` and every non-tensor entry with `weights_only=False`; here the
    metadata goes through the restricted unpickler first and entries through `load_torch_file`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    load_pickle(checkpoint / ".metadata", DCP_METADATA_PREFIXES)

    class SafePlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            loaded = load_torch_file(value, "a checkpoint entry", name=f"{checkpoint} ({fqn})")
            if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does after its unsafe torch.load
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(checkpoint)), planner=SafePlanner(keys=keys),
                     no_dist=True)  # fmt: skip
    return state

