"""Write offline tiny assets for tests and CPU recipes under OUT (default runs/tiny-assets):
`tokenizer/`, `llama_gqa/` (Llama, 8 heads / 2 KV groups), `qwen2/` (q/k/v biases, tied embeddings),
`corpus/` and `mds/` (a small multi-domain MDS set with train and eval splits)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from drpruning.tiny import make_tiny_mds
from drpruning.tiny_models import save_tiny_model


def make_tiny_assets(out: Path, seq_len: int = 64) -> Path:
    marker = out / ".complete"
    if marker.exists():
        print(f"{out} is complete; nothing to do")
        return out
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    make_tiny_mds(work, n_domains=4, seq_len=seq_len, eval_sequences=8, docs_per_domain=300)
    vocab_size = len(__import__("transformers").AutoTokenizer.from_pretrained(work / "tokenizer"))
    for kind in ("llama_gqa", "qwen2"):
        save_tiny_model(kind, work / kind, vocab_size=vocab_size)
        shutil.copytree(work / "tokenizer", work / kind, dirs_exist_ok=True)
    (work / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    print(f"wrote tiny assets to {out}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-assets"))
    make_tiny_assets(parser.parse_args().out)
