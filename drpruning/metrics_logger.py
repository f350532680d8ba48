"""A Composer logger that keeps every logged metric as JSON lines in the run folder.

`scripts/plot_run.py` reads the file back (sparsity, Lagrange multipliers, losses, per-domain eval loss),
so it must survive resumption: the logger's checkpointed state is the number of lines the file held at the
checkpoint, and a resumed run cuts the file back to exactly those lines before it appends again. A run
that starts from batch 0 starts a fresh file; an earlier run's file is never truncated, it is moved aside
with the rest of that run (`drpruning.runs.start_run_in_folder`). Nothing touches the file before the run
starts (its first eval or FIT_START), so a start refused by a config check leaves it as it was.
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist

from drpruning.runs import (
    METRICS_FILE,
    check_run_folder,
    keep_jsonl_lines,
    move_aside,
    run_folder,
    start_run_in_folder,
)

log = logging.getLogger(__name__)


def _as_float(value: Any) -> float | None:
    """A number or a one-element tensor/array as a python float; anything else (strings, vectors) is None."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    if callable(item) and getattr(value, "size", None) == 1:
        converted = item()
        return float(converted) if isinstance(converted, numbers.Real) else None
    return None


class JSONLMetricsLogger(LoggerDestination):
    """Append each `log_metrics(metrics, step)` call as `{"step": step, name: value, ...}` to `metrics.jsonl`.

    yaml (LLM-Foundry registers it as `jsonl`):
        loggers:
          jsonl: {}                        # or {folder: ..., filename: ...}

    Args:
        folder: where to write; `{run_name}` is substituted. Defaults to the run folder
            (`drpruning.runs.run_folder`), next to the checkpoints, so a resumed run finds its own file.
        filename: the file name inside `folder`. Defaults to `metrics.jsonl`, the name plots and the
            ablation script read.

    Non-scalar values (strings, vectors) are left out. The metric keys drpruning's components log are
    spelled in `drpruning.runs`.

    Only global rank 0 writes. Records logged before the run starts (the standalone eval of `eval_first`,
    else FIT_START) are held back and written once the file has been started or cut back for this run.
    """

    def __init__(self, folder: str | None = None, filename: str = METRICS_FILE) -> None:
        super().__init__()
        self.folder = folder
        self.filename = filename
        self.path: Path | None = None
        self._state: State | None = None
        self._is_writer = False
        self._pending: list[dict[str, Any]] = []
        self._aligned = False
        self._lines_in_file = 0
        self._checkpoint_lines: int | None = None

    # ------------------------------------------------------------------------------------ events
    def init(self, state: State, logger: Logger) -> None:
        self._state = state
        self._is_writer = dist.get_global_rank() == 0
        folder = Path(format_name_with_dist(self.folder, state.run_name)) if self.folder else run_folder(state)
        self.path = folder / self.filename

    def after_load(self, state: State, logger: Logger) -> None:
        check_run_folder(state)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        """`eval_first` evaluates before `fit()` starts, and its metrics belong to the run."""
        self._start(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start(state)

    def _start(self, state: State) -> None:
        """Make the file match an uninterrupted run up to the loaded timestamp, then flush held-back records.

        Not at AFTER_LOAD: the other components validate their configuration there and at FIT_START, and
        a refused start must not have cut the file.
        """
        if self._aligned:
            return
        start_run_in_folder(state)
        if self._is_writer:
            self._align_file_with_checkpoint(int(state.timestamp.batch))
            for record in self._pending:
                self._append(record)
        self._pending = []
        self._aligned = True

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._state is not None and not self._is_writer:
            return
        values = {name: _as_float(value) for name, value in metrics.items() if name != "step"}
        record: dict[str, Any] = {"step": self._resolve_step(step)}
        record.update({name: value for name, value in values.items() if value is not None})
        if len(record) == 1:
            return
        if self._aligned:
            self._append(record)
        else:
            self._pending.append(record)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Only the writer has a count: with sharded checkpoints every rank saves, and the value must be rank 0's."""
        return {"lines": self._lines_in_file} if self._is_writer else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lines" in state:
            self._checkpoint_lines = int(state["lines"])

    # ----------------------------------------------------------------------------------- helpers
    def _resolve_step(self, step: int | None) -> int:
        if step is not None:
            return int(step)
        return int(self._state.timestamp.batch) if self._state is not None else 0

    def _align_file_with_checkpoint(self, resumed_batch: int) -> None:
        assert self.path is not None
        if resumed_batch == 0:
            if self.path.exists():  # outside the run folder (a custom `folder`): keep the old file too
                moved = move_aside(self.path.parent, [self.path])
                log.warning("%s belongs to an earlier run; moved it to %s", self.path, moved)
        elif self._checkpoint_lines is not None:
            self._keep_first_lines(self._checkpoint_lines)
        else:
            # A checkpoint written without this logger: the best available cut is by step.
            keep_jsonl_lines(self.path, lambda record: record["step"] <= resumed_batch)
        self._lines_in_file = self._count_lines()

    def _keep_first_lines(self, count: int) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) > count:
            self.path.write_text("".join(lines[:count]), encoding="utf-8")

    def _count_lines(self) -> int:
        assert self.path is not None
        if not self.path.exists():
            return 0
        return len(self.path.read_text(encoding="utf-8").splitlines())

    def _append(self, record: dict[str, Any]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._lines_in_file += 1
