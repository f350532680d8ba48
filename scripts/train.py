"""Train with LLM-Foundry's trainer: `composer -n N scripts/train.py <yaml> [key=value ...]`.

drpruning's model, callbacks, dataloader and config transform are registered through entry points
(pyproject.toml), so this is LLM-Foundry's own `train_from_yaml` and nothing else.
"""

import sys

from llmfoundry.command_utils import train_from_yaml

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: composer -n N scripts/train.py <yaml> [key=value ...]")
    train_from_yaml(sys.argv[1], sys.argv[2:])
