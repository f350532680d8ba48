"""Tokenize and pack per-domain text into MDS train/eval splits (drpruning/data/prepare.py); with
`--remote URL`, upload the result there too (drpruning/data/prepare_cli.py, drpruning/data/remote.py).

Example:
    python scripts/prepare_data.py --tokenizer TOKENIZER_DIR --seq-len 256 --eval-sequences 64 \
        --out data/mix --domain code='lib/**/*.py' --domain books=austen.jsonl.gz [--remote s3://bucket/mix]
"""

import sys

from drpruning.data.prepare_cli import main

if __name__ == "__main__":
    sys.exit(main())
