"""Tokenize and pack per-domain text into MDS train/eval splits (see drpruning/data_prep.py).

Example:
    python scripts/prepare_data.py --tokenizer TOKENIZER_DIR --seq-len 256 --eval-sequences 64 \
        --out data/mix --domain code='lib/**/*.py' --domain books=austen.jsonl.gz
"""

import sys

from drpruning.data_prep import main

if __name__ == "__main__":
    sys.exit(main())
