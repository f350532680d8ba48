"""Write offline tiny assets for tests and CPU recipes under OUT (default runs/tiny-assets):
`tokenizer/`, `llama_gqa/` (Llama, 8 heads / 2 KV groups), `qwen2/` (q/k/v biases, tied embeddings),
`corpus/` and `mds/` (a small four-domain MDS set with train and eval splits)."""

import argparse
import sys
from pathlib import Path

from drpruning.demo.tiny import make_tiny_assets
from drpruning.errors import ConfigError, report_error

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-assets"))
    try:
        out = make_tiny_assets(parser.parse_args().out)
    except ConfigError as error:
        sys.exit(report_error(error, prog="make_tiny_assets"))
    print(f"tiny assets ready in {out}")
