"""Test-only callback, loaded through the yaml key `code_paths`: makes one domain's eval loss NaN on one rank.

It poisons the `LanguageCrossEntropy` state at EVAL_BATCH_END, before Composer computes the metric, so the
NaN travels the real path: `compute()` sums the ranks' states, every rank reads NaN, Composer logs it and
the data scheduler sees it at EVAL_AFTER_ALL.
"""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from llmfoundry import registry


class NaNEvalProbe(Callback):
    """Args: domain (whose eval loss turns NaN), steps (train batches at whose eval it does), rank (which rank)."""

    def __init__(self, domain: str, steps: list[int], rank: int = 1) -> None:
        self.label = f"eval/{domain}"
        self.steps = {int(step) for step in steps}
        self.rank = rank

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        if (state.dataloader_label != self.label or int(state.timestamp.batch) not in self.steps
                or dist.get_global_rank() != self.rank):
            return
        state.eval_metrics[self.label]["LanguageCrossEntropy"].sum_loss.fill_(float("nan"))


registry.callbacks.register("nan_eval_probe", func=NaNEvalProbe)
