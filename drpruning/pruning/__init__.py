"""Structured pruning: target shapes, hard-concrete L0 masks, the masked HF model, its Composer model
and the `pruning` callback, and gate initialisation from measured importance."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpruning._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time each loads on first use
    from drpruning.pruning.calibration import CalibrationConfig as CalibrationConfig
    from drpruning.pruning.callback import PruningCallback as PruningCallback
    from drpruning.pruning.importance import (
        Importance as Importance,
        calibrate as calibrate,
        compute_importance as compute_importance,
    )
    from drpruning.pruning.masks import L0Module as L0Module
    from drpruning.pruning.model import DRPruningCausalLM as DRPruningCausalLM
    from drpruning.pruning.prunable import make_prunable as make_prunable
    from drpruning.pruning.shapes import (
        PRUNING_MODULES as PRUNING_MODULES,
        TARGET_KEYS as TARGET_KEYS,
        ModelShape as ModelShape,
        target_shape as target_shape,
    )

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
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
})
