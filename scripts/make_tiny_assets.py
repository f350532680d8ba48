"""Write offline tiny assets for tests and CPU recipes under OUT (default runs/tiny-assets):
`tokenizer/`, `llama_gqa/` (Llama, 8 heads / 2 KV groups), `qwen2/` (q/k/v biases, tied embeddings),
`corpus/` and `mds/` (a small four-domain MDS set with train and eval splits)."""

import argparse
from pathlib import Path

from drpruning.demo.tiny import make_tiny_assets

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-assets"))
    out = make_tiny_assets(parser.parse_args().out)
    print(f"tiny assets ready in {out}")
