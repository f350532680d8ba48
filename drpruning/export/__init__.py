"""From a pruning run (or a one-shot ranking) to a plain dense Hugging Face model.

One module per job: `checkpoint` reads a Composer checkpoint or run folder, `dense` turns masks into kept
units and folds them into a smaller model with the same logits, `write` saves it safely, `convert` is the
run → export path (scripts/prune_to_dense.py), `one_shot` the importance-only path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpruning._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time each loads on first use
    from drpruning.export.checkpoint import (
        PruningCheckpoint as PruningCheckpoint,
        load_pruning_checkpoint as load_pruning_checkpoint,
        resolve_checkpoint as resolve_checkpoint,
    )
    from drpruning.export.convert import export_run as export_run
    from drpruning.export.dense import (
        KeptUnits as KeptUnits,
        dense_export as dense_export,
        kept_units as kept_units,
        prune_to_dense as prune_to_dense,
        pruning_summary as pruning_summary,
    )
    from drpruning.export.one_shot import one_shot_prune as one_shot_prune
    from drpruning.export.write import save_export as save_export

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
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
})
