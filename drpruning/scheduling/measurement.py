"""What the scheduler measures and records: the training statistics summed over ranks, their loss EMA
(`loss_source: train_ema`), the per-domain eval losses (`loss_source: eval`, and the source model's at the
`eval_first` eval), each update's `schedule.jsonl` record and the run's data usage. The decisions made
from them are `scheduler.py`'s."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist
from torch import Tensor

from drpruning.runs import (
    DATA_METRICS_PREFIX,
    DATA_USAGE_FILE,
    SCHEDULE_FILE,
    append_jsonl,
    run_folder,
    write_json,
)

log = logging.getLogger(__name__)

EVAL_METRIC = "LanguageCrossEntropy"


def summed_over_ranks(loss_sums: Tensor, token_counts: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain (loss sum, token count) of every rank, added up in one all-reduce (float64)."""
    stacked = torch.stack([loss_sums.to(torch.float64), token_counts.to(torch.float64)])
    dist.all_reduce(stacked, reduce_operation="SUM")
    totals = stacked.cpu().numpy()
    return totals[0], totals[1]


def read_eval_losses(state: State, domains: Sequence[str]) -> np.ndarray:
    """Per-domain eval CE from the `eval/<domain>` evaluators; `compute()` syncs across ranks, so every rank
    must call this."""
    losses = []
    for domain in domains:
        label = f"eval/{domain}"
        metrics = state.eval_metrics.get(label)
        if metrics is None or EVAL_METRIC not in metrics:
            raise KeyError(f"DataScheduler needs the {EVAL_METRIC} metric of evaluator '{label}'; found "
                           f"evaluators {sorted(state.eval_metrics)} (see the drpruning_domain_eval transform)")
        losses.append(float(metrics[EVAL_METRIC].compute()))
    return np.array(losses, dtype=np.float64)


def source_losses(state: State, domains: Sequence[str]) -> np.ndarray:
    """The eval losses that become `reference_losses: source`: the source model's at the `eval_first` eval
    (a later eval is used with a warning). Never skipped when not finite: a later eval of a half-pruned model
    would silently become the "source" reference."""
    batch = int(state.timestamp.batch)
    losses = read_eval_losses(state, domains)
    bad = [domain for domain, value in zip(domains, losses, strict=True) if not np.isfinite(value)]
    if bad:
        raise FloatingPointError(f"DataScheduler: non-finite source eval loss for domain(s) {bad} at step "
                                 f"{batch}; reference_losses: source needs finite losses of the source model")
    if batch > 0:
        log.warning("DataScheduler: reference losses taken from the eval at step %d, not from the source "
                    "model; set eval_first: true to measure the source model", batch)
    log.info("DataScheduler: source reference losses %s", dict(zip(domains, losses.tolist(), strict=True)))
    return losses


class LossEma:
    """Exponential moving average of each domain's train loss, over the batches that had its tokens."""

    def __init__(self, domains: Sequence[str], weight: float) -> None:
        self.domains = list(domains)
        self.weight = weight
        self.values: list[float | None] = [None] * len(self.domains)

    def update(self, loss_sums: np.ndarray, token_counts: np.ndarray, on_non_finite: Callable[[list[str]], None]
               ) -> None:
        """Fold in one batch; a domain whose mean loss is not finite is reported and keeps its value."""
        for index in np.flatnonzero(token_counts > 0):
            mean = float(loss_sums[index] / token_counts[index])
            if not np.isfinite(mean):
                on_non_finite([self.domains[index]])
                continue
            previous = self.values[index]
            self.values[index] = mean if previous is None else (1.0 - self.weight) * previous + self.weight * mean

    def losses(self, batch: int) -> np.ndarray | None:
        """Every domain's EMA, or None (and a log line) while a domain has had no tokens."""
        unseen = [domain for domain, value in zip(self.domains, self.values, strict=True) if value is None]
        if unseen:
            log.info("DataScheduler: step %d waits for train losses of domain(s) %s", batch, unseen)
            return None
        return np.array(self.values, dtype=np.float64)


def write_data_usage(state: State, logger: Logger, domains: Sequence[str], tokens: np.ndarray) -> None:
    """Total tokens and token fraction per domain (paper Table 3) to the loggers and
    `<run folder>/data_usage.json`."""
    total = float(tokens.sum())
    fractions = tokens / total if total > 0 else np.zeros_like(tokens)
    metrics = {}
    for domain, count, fraction in zip(domains, tokens, fractions, strict=True):
        metrics[f"{DATA_METRICS_PREFIX}{domain}/total_tokens"] = float(count)
        metrics[f"{DATA_METRICS_PREFIX}{domain}/token_fraction"] = float(fraction)
    logger.log_metrics(metrics)
    write_json(run_folder(state) / DATA_USAGE_FILE, {
        "step": int(state.timestamp.batch),
        "total_tokens": total,
        "domains": {domain: {"tokens": float(count), "fraction": float(fraction)}
                    for domain, count, fraction in zip(domains, tokens, fractions, strict=True)},
    })


def schedule_record(domains: Sequence[str], batch: int, effective_batch: int, losses: np.ndarray,
                    reference_losses: Sequence[float] | None, reference_ratio: Sequence[float],
                    proportions: Sequence[float], tokens: np.ndarray, expected_params: float | None) -> dict[str, Any]:
    """One `schedule.jsonl` line; `proportions` are the mixer's, exactly what was sampled from."""
    def by_domain(values: Sequence[float] | None) -> dict[str, float] | None:
        return None if values is None else dict(zip(domains, (float(v) for v in values), strict=True))

    return {
        "step": batch,
        "effective_batch": effective_batch,
        "losses": by_domain(losses.tolist()),
        "reference_losses": by_domain(reference_losses),
        "reference_ratio": by_domain(reference_ratio),
        "proportions": by_domain(proportions),
        "tokens": by_domain(tokens.tolist()),
        "expected_params": expected_params,
    }


def log_schedule_record(state: State, logger: Logger, record: dict[str, Any]) -> None:
    """The record's per-domain values to the loggers, and the record to `schedule.jsonl` (rank 0 only)."""
    metrics = {}
    for key, name in (("losses", "loss"), ("reference_losses", "reference_loss"),
                      ("reference_ratio", "reference_ratio"), ("proportions", "proportion")):
        for domain, value in (record[key] or {}).items():
            metrics[f"{DATA_METRICS_PREFIX}{domain}/{name}"] = value
    logger.log_metrics(metrics)
    append_jsonl(run_folder(state) / SCHEDULE_FILE, record)
