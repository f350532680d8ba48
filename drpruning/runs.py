"""Small helpers shared by the callbacks: where a run writes its artefacts, the metric keys it logs, rank-0
file writes, and the check that a run starting from scratch does not write into (or truncate) the files of an
earlier run.

A run folder holds one run. When a run starts from batch 0 in a folder that already holds run artefacts
(checkpoints, `metrics.jsonl`, `schedule.jsonl`, `masks/`, ...), the writers
- refuses, if the folder holds a checkpoint and `save_overwrite` is off: resume it with `autoresume: true`,
  pick a new `save_folder`, or set `save_overwrite: true`;
- otherwise moves the earlier artefacts, as a whole, into `<folder>/.replaced-<UTC time>/` (hidden, so
  Composer ignores it) and says so. A folder with artefacts but no checkpoint is an earlier start of the
  same command that died before its first checkpoint (autoresume has nothing to load); moving it aside
  keeps restarts of preempted jobs working. With `save_overwrite: true` a folder that also holds files no
  run writes is refused rather than sorted.
The writers check the folder at AFTER_LOAD (`check_run_folder`, which only reads it, so a refusal changes
nothing and comes before Composer's own checkpoint-name check) and write, truncate or move nothing before
the run really starts (`start_run_in_folder`: the standalone eval of `eval_first`, or FIT_START), after
every component has validated its config. A resumed run (batch > 0 after loading) cuts its own files back
to the checkpoint and appends.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist

from drpruning.errors import ConfigError

log = logging.getLogger(__name__)

# The run folder's layout, spelled once: the callbacks and the metrics logger write these names; export,
# plots, the demo and the ablation script read them.
METRICS_FILE = "metrics.jsonl"  # every logged metric, one JSON line per step (metrics_logger.py)
SCHEDULE_FILE = "schedule.jsonl"  # one line per data-scheduler update (scheduling/scheduler.py)
DATA_USAGE_FILE = "data_usage.json"  # tokens seen per domain (scheduling/scheduler.py)
MASKS_DIR = "masks"  # target masks `ba<step>.pt` after each eval, and the pruning metadata (pruning/callback.py)
MASKS_META_FILE = "meta.json"  # inside MASKS_DIR: source, shapes, pruning modules
IMPORTANCE_FILE, IMPORTANCE_SUMMARY_FILE = "importance.pt", "importance.json"  # pruning/importance.py
PLOTS_DIR = "plots"  # scripts/plot_run.py
HF_CHECKPOINTS_DIR = "huggingface"  # LLM-Foundry's hf_checkpointer
PRUNING_STATE_KEY = "PruningCallback"  # Composer keys a callback's checkpointed state by its class name

# The metric keys in `metrics.jsonl`, spelled once: the callbacks log them; plots and the ablation script read them.
TRAIN_LOSS_PREFIX = "loss/train/"  # Composer: `loss/train/<name>` for each entry of the model's loss dict
PRUNING_METRICS_PREFIX = "metrics/pruning/"  # each step: `<stat>/<module>`, `expected_params` (pruning/callback.py)
EVAL_MASKS_KEPT_PREFIX = "metrics/eval_masks/kept/"  # `<module>`: mean kept units per row of the model an eval scored
EVAL_MASKS_PARAMS_KEY = "metrics/eval_masks/params"  # the parameter count of that model (pruning/callback.py)
EVAL_LOSS_PREFIX = "metrics/eval/"  # Composer: `metrics/eval/<domain>/LanguageCrossEntropy` for evaluator eval/<domain>
EVAL_LOSS_SUFFIX = "/LanguageCrossEntropy"
DATA_METRICS_PREFIX = "metrics/data/"  # `<domain>/<name>` of the data scheduler (scheduling/scheduler.py)

REPLACED_PREFIX = ".replaced-"
_CHECKPOINT = re.compile(r"^(ep\d+-ba\d+(-rank\d+)?|latest-rank\d+)(\.pt)?(\.tar)?(\.symlink)?$")
_RUN_FILES = {METRICS_FILE, SCHEDULE_FILE, DATA_USAGE_FILE, MASKS_DIR, PLOTS_DIR, HF_CHECKPOINTS_DIR, "runtime_s.txt",
              IMPORTANCE_FILE, IMPORTANCE_SUMMARY_FILE}
"""What drpruning's callbacks, `hf_checkpointer`, `scripts/plot_run.py` and `scripts/ablation.py` write."""
_CHECKED_ATTR = "_drpruning_run_folder_checked"
_STARTED_ATTR = "_drpruning_run_folder_started"


def masks_file(folder: Path, step: int) -> Path:
    """The target masks dumped at `step` (after that step's eval; step 0: the importance-ordered start)."""
    return folder / MASKS_DIR / f"ba{step}.pt"


def eval_loss_domain(key: str) -> str | None:
    """The domain of an eval-loss key `metrics/eval/<domain>/LanguageCrossEntropy`, "" for the key of an
    unlabelled evaluator (`metrics/eval/LanguageCrossEntropy`), None for any other key."""
    if key == EVAL_LOSS_PREFIX + EVAL_LOSS_SUFFIX.removeprefix("/"):
        return ""
    if len(key) > len(EVAL_LOSS_PREFIX) + len(EVAL_LOSS_SUFFIX) and key.startswith(EVAL_LOSS_PREFIX) \
            and key.endswith(EVAL_LOSS_SUFFIX):
        return key[len(EVAL_LOSS_PREFIX):-len(EVAL_LOSS_SUFFIX)]
    return None


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


def is_run_artefact(name: str) -> bool:
    """A file or folder name that a training run (or its plots) writes into the run folder."""
    return name in _RUN_FILES or bool(_CHECKPOINT.match(name))


def _save_overwrite(state: State) -> bool:
    return any(callback.overwrite for callback in state.callbacks if isinstance(callback, CheckpointSaver))


def move_aside(folder: Path, entries: list[Path]) -> Path:
    """Move `entries` (inside `folder`) into a new hidden `folder/.replaced-<UTC time>/`; returns it."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{REPLACED_PREFIX}{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"{REPLACED_PREFIX}{stamp}-{suffix}"
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def prepare_fresh_run_folder(folder: Path, overwrite: bool, dry_run: bool = False) -> str | None:
    """Make `folder` hold no earlier run's artefacts for a run that starts at batch 0 (see the module doc).

    Returns a note on what was moved (None: nothing); raises `ConfigError`, having changed nothing, when the
    folder holds an earlier run that must not be replaced. `dry_run` only checks.
    """
    if not folder.is_dir():
        return None
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    artefacts = [p for p in entries if is_run_artefact(p.name)]
    if not artefacts:
        return None
    names = ", ".join(p.name for p in artefacts[:6]) + (f" and {len(artefacts) - 6} more" if len(artefacts) > 6 else "")
    checkpoints = [p for p in artefacts if _CHECKPOINT.match(p.name)]
    if checkpoints and not overwrite:
        raise ConfigError(
            f"save_folder {folder} holds an earlier run ({names}) and this run starts from batch 0, so their files "
            "would mix: resume it with autoresume=true, choose a new save_folder, or set save_overwrite=true to "
            f"move the earlier run's files into {folder}/{REPLACED_PREFIX}<time>/"
        )
    others = [p.name for p in entries if not is_run_artefact(p.name)]
    if overwrite and others:
        raise ConfigError(
            f"save_folder {folder} holds an earlier run ({names}) and files no run writes ({', '.join(others[:6])}); "
            "save_overwrite=true moves an earlier run aside only from a folder that holds nothing else: choose a "
            "new save_folder"
        )
    if dry_run:
        return None
    target = move_aside(folder, artefacts)
    return (f"save_folder {folder} held an earlier run's files ({names}); this run starts from batch 0, so they "
            f"were moved to {target} (delete it when no longer needed)")  # fmt: skip


def _run_folder_verdict(state: State, dry_run: bool) -> None:
    """Global rank 0 checks (and unless `dry_run`, clears) the folder of a run starting at batch 0; every rank
    receives the verdict, so a refusal raises the same `ConfigError` everywhere instead of leaving ranks
    waiting in a collective."""
    verdict: list[Any] = [None]
    if dist.get_global_rank() == 0 and int(state.timestamp.batch) == 0:
        try:
            verdict[0] = ("note", prepare_fresh_run_folder(run_folder(state), _save_overwrite(state), dry_run))
        except ConfigError as error:
            verdict[0] = ("error", str(error))
    dist.broadcast_object_list(verdict)
    if verdict[0] is None:
        return
    kind, message = verdict[0]
    if kind == "error":
        raise ConfigError(message)
    if message and dist.get_global_rank() == 0:
        log.warning(message)


def check_run_folder(state: State) -> None:
    """At AFTER_LOAD, on every rank: refuse a run folder that holds an earlier run this run may not replace.

    Only checks, so a refusal changes nothing; it comes before Composer's own FIT_START check of the
    checkpoint names (a traceback) and before anything is written. Only the first call does anything.
    """
    if getattr(state, _CHECKED_ATTR, False):
        return
    setattr(state, _CHECKED_ATTR, True)
    _run_folder_verdict(state, dry_run=True)


def start_run_in_folder(state: State) -> None:
    """Call on every rank before a run's first write into its folder; only the first call does anything.

    For a run starting at batch 0, moves an earlier run's files aside (or refuses, see the module doc).
    """
    if getattr(state, _STARTED_ATTR, False):
        return
    setattr(state, _STARTED_ATTR, True)
    _run_folder_verdict(state, dry_run=False)
