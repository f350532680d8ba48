"""Train with LLM-Foundry's trainer: `composer -n N scripts/train.py <yaml> [key=value ...]`.

drpruning's model, callbacks, dataloader and config transform are registered through entry points
(pyproject.toml), so this is LLM-Foundry's own `train_from_yaml`. On CPU, each rank gets its share of the
cores (unless OMP_NUM_THREADS is set): N ranks with all-core thread pools each would oversubscribe.
"""

import os
import sys

import torch
from llmfoundry.command_utils import train_from_yaml

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: composer -n N scripts/train.py <yaml> [key=value ...]")
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    train_from_yaml(sys.argv[1], sys.argv[2:])
