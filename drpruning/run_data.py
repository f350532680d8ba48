"""A run folder read back: metric curves from `metrics.jsonl`, the data scheduler's `schedule.jsonl`, how
fast the masks in `masks/ba<step>.pt` settle, and `data_usage.json` (what `drpruning/plots.py` draws)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drpruning.pruning.shapes import PRUNING_MODULES, UNIT_COUNT_KEYS
from drpruning.runs import (
    DATA_USAGE_FILE,
    MASKS_DIR,
    MASKS_META_FILE,
    METRICS_FILE,
    PRUNING_METRICS_PREFIX,
    SCHEDULE_FILE,
    TRAIN_LOSS_PREFIX,
    eval_loss_domain,
)

GRANULARITIES = PRUNING_MODULES
EXPECTED_SPARSITY = PRUNING_METRICS_PREFIX + "expected_sparsity/"
TARGET_SPARSITY = PRUNING_METRICS_PREFIX + "target_sparsity/"
LAMBDA_1 = PRUNING_METRICS_PREFIX + "lambda_1/"
LAMBDA_2 = PRUNING_METRICS_PREFIX + "lambda_2/"
LM_LOSS = TRAIN_LOSS_PREFIX + "lm_loss"
LAGRANGIAN_LOSS = TRAIN_LOSS_PREFIX + "lagrangian_loss"
SOURCE_SIZE_KEYS = UNIT_COUNT_KEYS  # the key of each module's unit count in a recorded source shape
MASK_FILE = re.compile(r"^ba(\d+)\.pt$")

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


# ------------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, or [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metric_curves(records: Sequence[dict[str, Any]]) -> dict[str, Curve]:
    """Each metric of `metrics.jsonl` as (steps, values) sorted by step; a later value at the same step wins."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                by_name.setdefault(name, {})[step] = float(value)
    return {name: _curve(points) for name, points in by_name.items()}


def schedule_curves(records: Sequence[dict[str, Any]], key: str) -> dict[str, Curve]:
    """Per-domain curves of one `schedule.jsonl` field (`proportions`, `reference_ratio`, `losses`, ...)."""
    by_domain: dict[str, dict[int, float]] = {}
    for record in records:
        for domain, value in (record.get(key) or {}).items():
            if value is not None:
                by_domain.setdefault(domain, {})[int(record["step"])] = float(value)
    return {domain: _curve(points) for domain, points in by_domain.items()}


def _curve(points: dict[int, float]) -> Curve:
    steps = sorted(points)
    return np.array(steps, dtype=np.int64), np.array([points[step] for step in steps], dtype=np.float64)


def mask_similarity(mask: torch.Tensor, final: torch.Tensor) -> float:
    """|M ∩ M_final| / |M_final| over kept (non-zero) units: the share of the final decisions already made."""
    if mask.shape != final.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the final mask's {tuple(final.shape)}")
    kept_final = final != 0
    total = int(kept_final.sum())
    if total == 0:
        return float("nan")
    return int(((mask != 0) & kept_final).sum()) / total


def mask_convergence(masks_dir: Path) -> dict[str, Curve]:
    """For each granularity in `masks/ba<step>.pt`, the similarity of every step's masks to the last step's."""
    files = sorted(
        ((int(match.group(1)), path) for path in masks_dir.glob("ba*.pt") if (match := MASK_FILE.match(path.name))),
        key=lambda item: item[0],
    )
    if not files:
        return {}
    masks = {step: torch.load(path, map_location="cpu", weights_only=True) for step, path in files}
    final = masks[files[-1][0]]
    names = [name for name in GRANULARITIES if name in final] + sorted(set(final) - set(GRANULARITIES))
    curves = {}
    for name in names:
        points = {step: mask_similarity(step_masks[name], final[name]) for step, step_masks in masks.items()
                  if name in step_masks}  # fmt: skip
        curves[name] = _curve(points)
    return curves


@dataclass
class RunData:
    """Everything the page shows, read from one run folder."""

    run_dir: Path
    schedule: list[dict[str, Any]]
    metrics: dict[str, Curve]
    has_metrics_file: bool
    mask_curves: dict[str, Curve]
    data_usage: dict[str, Any] | None
    meta: dict[str, Any] | None
    domains: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> RunData:
        metrics_path = run_dir / METRICS_FILE
        usage_path = run_dir / DATA_USAGE_FILE
        meta_path = run_dir / MASKS_DIR / MASKS_META_FILE
        run = cls(
            run_dir=run_dir,
            schedule=read_jsonl(run_dir / SCHEDULE_FILE),
            metrics=metric_curves(read_jsonl(metrics_path)),
            has_metrics_file=metrics_path.exists(),
            mask_curves=mask_convergence(run_dir / MASKS_DIR),
            data_usage=json.loads(usage_path.read_text(encoding="utf-8")) if usage_path.exists() else None,
            meta=json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None,
        )
        run.domains = run._domains_in_order()
        return run

    def _domains_in_order(self) -> list[str]:
        """Domains in the scheduler's order, then any others the usage or eval metrics name."""
        ordered: list[str] = []
        for record in self.schedule[:1]:
            ordered += list(record.get("proportions") or {})
        ordered += list((self.data_usage or {}).get("domains", {}))
        ordered += list(self.eval_losses())
        return list(dict.fromkeys(ordered))

    def eval_losses(self) -> dict[str, Curve]:
        """Per-domain eval cross-entropy from `metrics.jsonl` (an unlabelled evaluator is called `eval`)."""
        curves = {}
        for name, curve in self.metrics.items():
            domain = eval_loss_domain(name)
            if domain is not None:
                curves[domain or "eval"] = curve
        return curves

    def modules(self, prefix: str) -> list[str]:
        """The pruning modules that have a metric named `<prefix><module>`, in granularity order."""
        found = {name[len(prefix):] for name in self.metrics if name.startswith(prefix)}
        return [m for m in GRANULARITIES if m in found] + sorted(found - set(GRANULARITIES))
