"""Structured pruning: target shapes, hard-concrete L0 masks, the masked HF model, its Composer model
and the `pruning` callback, and gate initialisation from measured importance."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "PRUNING_MODULES": "shapes",
    "TARGET_KEYS": "shapes",
    "ModelShape": "shapes",
    "target_shape": "shapes",
    "L0Module": "masks",
    "make_prunable": "prunable",
    "DRPruningCausalLM": "model",
    "PruningCallback": "callback",
    "CalibrationConfig": "calibration",
    "Importance": "importance",
    "calibrate": "importance",
    "compute_importance": "importance",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one light module (e.g. `drpruning.pruning.masks`) does not pull in Composer.
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
