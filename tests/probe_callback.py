"""Test-only callback, loaded through the yaml key `code_paths`: each rank records, per train batch, the
proportions its mixer holds and the domains it trained on, into `$DRPRUNING_PROBE_DIR/rank<r>.jsonl`."""

import json
import os
from pathlib import Path

from composer.core import Callback
from composer.utils import dist
from llmfoundry import registry


class BatchProbe(Callback):
    def after_train_batch(self, state, logger):
        batch = int(state.timestamp.batch)
        record = {
            "batch": batch,
            "proportions": [float(p).hex() for p in state.train_dataloader.dataset.proportions_at(batch)],
            "domains": state.batch["domain"].tolist(),
        }
        path = Path(os.environ["DRPRUNING_PROBE_DIR"]) / f"rank{dist.get_global_rank()}.jsonl"
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


registry.callbacks.register("batch_probe", func=BatchProbe)
