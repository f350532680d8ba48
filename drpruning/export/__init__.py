"""From a pruning run (or a one-shot ranking) to a plain dense Hugging Face model.

One module per job: `checkpoint` reads a Composer checkpoint or run folder, `dense` turns masks into kept
units and folds them into a smaller model with the same logits, `write` saves it safely, `convert` is the
run → export path (scripts/prune_to_dense.py), `one_shot` the importance-only path.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "PruningCheckpoint": "checkpoint",
    "load_pruning_checkpoint": "checkpoint",
    "resolve_checkpoint": "checkpoint",
    "KeptUnits": "dense",
    "kept_units": "dense",
    "prune_to_dense": "dense",
    "dense_export": "dense",
    "pruning_summary": "dense",
    "save_export": "write",
    "export_run": "convert",
    "one_shot_prune": "one_shot",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy, like the other subpackages: importing the package does not pull in Composer.
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
