"""What the `data_scheduler` needs from the rest of a run, as typed contracts checked at setup.

The scheduler never imports the mixer or the model: a train dataset that satisfies `MixtureDataset`
(`drpruning.data.mixer.DomainMixtureDataset` does) and an unwrapped model that satisfies
`DomainStatsModel` (`drpruning.pruning.model.DRPruningCausalLM` does) are all it relies on.
Both methods of `MixtureDataset` must be called with identical arguments on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class MixtureDataset(Protocol):
    """What the scheduler needs from the train dataset (`drpruning.data.mixer.DomainMixtureDataset`).

    `domains` fixes the domain ids (a batch's `domain` tensor indexes it); proportions are arrays in that
    order. The mixer's loader requests `lag = num_workers * prefetch_factor` batches ahead, so a new
    mixture can only take effect at `consumed + lag` or later.
    """

    domains: Sequence[str]
    initial_proportions: Sequence[float] | np.ndarray

    def proportions_at(self, batch: int) -> np.ndarray:
        """The proportions in force for global batch `batch`."""
        ...

    def set_proportions(self, proportions: np.ndarray, at_batch: int | None = None) -> int:
        """Use `proportions` from `at_batch` (default: the first batch not yet requested) on; returns that batch."""
        ...


class DomainStatsTaker(Protocol):
    """Per-domain sums of this rank's training microbatches; the caller all-reduces them."""

    def take(self, num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token cross-entropy, target-token count), float64 `[num_domains]` each, since the last
        call, then reset. Raises if a domain id ≥ `num_domains` was seen."""
        ...


@runtime_checkable
class DomainStatsModel(Protocol):
    """What the scheduler needs from the unwrapped model (`drpruning.pruning.model.DRPruningCausalLM`)."""

    domain_stats: DomainStatsTaker

    def pruning_stats(self) -> dict[str, float] | None:
        """None without pruning (continued pretraining); else python floats from the last training
        forward: `expected_params`, `target_params`, `source_params` and, per pruning module m,
        `expected_sparsity/m`, `target_sparsity/m`, `lambda_1/m`, `lambda_2/m`."""
        ...


@runtime_checkable
class DistillingModel(Protocol):
    """A model trained with a distillation term (`model.distillation`): the scheduler logs its per-domain
    training distillation loss beside the LM losses it schedules on (it never schedules on it)."""

    distill_stats: DomainStatsTaker
    distillation: object | None
