"""Small helpers shared by the callbacks: where a run writes its artefacts, and rank-0 file writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist


def run_folder(state: State) -> Path:
    """The CheckpointSaver's local folder formatted with the run name, else `runs/<run_name>`.

    Artefacts sit next to the checkpoints so a resumed run finds (and continues) its own files.
    """
    for callback in state.callbacks:
        if isinstance(callback, CheckpointSaver):
            return Path(format_name_with_dist(callback.folder, state.run_name))
    return Path("runs") / state.run_name


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel inside a DDP wrapper (FSDP and single-process runs hand it over directly)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line on global rank 0 (the other ranks hold the same record and write nothing)."""
    if dist.get_global_rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def keep_jsonl_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """On global rank 0, rewrite `path` with only the records for which `keep` is true (no-op if absent)."""
    if dist.get_global_rank() != 0 or not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write one JSON document on global rank 0."""
    if dist.get_global_rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
