"""Test-only callback, loaded through the yaml key `code_paths`: each rank records, per train batch, the
proportions its mixer holds, the domains it trained on and a digest of its token ids, into
`$DRPRUNING_PROBE_DIR/rank<r>.jsonl`."""

import hashlib
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
            "input_ids_sha1": hashlib.sha1(state.batch["input_ids"].cpu().numpy().tobytes()).hexdigest(),
        }
        path = Path(os.environ["DRPRUNING_PROBE_DIR"]) / f"rank{dist.get_global_rank()}.jsonl"
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


registry.callbacks.register("batch_probe", func=BatchProbe)
