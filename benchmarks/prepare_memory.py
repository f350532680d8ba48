"""prepare_data's memory on one long single-line document, against the document's size.

    .venv/bin/python benchmarks/prepare_memory.py --megabytes 50 --tokenizer runs/demo/source

Writes a one-line document of random words (no line break anywhere), prepares it in a fresh process, and
reports that process's peak RSS above its RSS once everything is imported and the tokenizer loaded (the
runtime's own ~0.8 GiB is not the document's), as a multiple of the document's size. Goal: under 10x.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from drpruning.data.prepare import prepare_data
from drpruning.data.tokenize import load_tokenizer
source, tokenizer, out = sys.argv[1:4]
load_tokenizer(tokenizer)
def rss_kib():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
base = rss_kib()
Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
start = time.perf_counter()
prepare_data({'long': source}, tokenizer, out, seq_len=128, eval_sequences=1, show_progress=False)
peak = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))
print(json.dumps({'base_kib': base, 'peak_kib': peak, 'seconds': time.perf_counter() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/demo/source"))
    args = parser.parse_args()
    words = ["river", "delta", "mountain", "glacier", "syntax", "lambda", "Kernel", "übung", "42", "x=1;"]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        doc = Path(folder) / "long.txt"
        size = int(args.megabytes * 1e6)
        with doc.open("w", encoding="utf-8") as handle:
            written = 0
            while written < size:
                chunk = " ".join(rng.choice(words) for _ in range(10_000)) + " "
                handle.write(chunk)
                written += len(chunk.encode())
        nbytes = doc.stat().st_size
        result = subprocess.run([sys.executable, "-c", CHILD, str(doc), str(args.tokenizer), str(Path(folder) / "out")],
                                capture_output=True, text=True, check=True)  # fmt: skip
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    extra = (figures["peak_kib"] - figures["base_kib"]) * 1024
    print(f"document {nbytes / 1e6:.1f} MB on one line; peak RSS above the loaded runtime {extra / 1e6:,.0f} MB = "
          f"{extra / nbytes:.2f}x the document; {figures['seconds']:.0f} s")


if __name__ == "__main__":
    main()
