"""Per-domain loss and perplexity of a Hugging Face causal LM on a prepared data folder's eval split.

Example:
    python scripts/eval_domains.py models/drpruning-1.3b data/redpajama-llama2-4096 --out eval.json

See drpruning/evaluation.py.
"""

import sys

from drpruning.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
