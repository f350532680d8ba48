"""LLM-Foundry's own evaluation (ICL tasks, eval loaders) of Hugging Face model folders.

    composer -n N scripts/eval.py yamls/eval/downstream.yaml variables.model_dir=models/drpruning-1.3b

This is LLM-Foundry's `eval_from_yaml` and nothing else: the exported models are stock HF folders, so
the stock `hf_causal_lm` model loads them. It prints a markdown table of every task's metrics.
"""

import sys

from llmfoundry.command_utils import eval_from_yaml

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: composer -n N scripts/eval.py <yaml> [key=value ...]")
    eval_from_yaml(sys.argv[1], sys.argv[2:])
