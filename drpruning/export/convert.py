"""A pruning run → a dense, stock Hugging Face directory: the whole job and its command line.

`export_run` reads a Composer checkpoint (monolithic or sharded; `checkpoint.py`), rebuilds the source model
and its `L0Module`, exports and checks the logits (`dense.py`), and writes a standard HF directory
(`write.py`). `scripts/prune_to_dense.py` is `main`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from drpruning.atomic import preflight
from drpruning.errors import ConfigError, ExportError, report_error
from drpruning.export.checkpoint import load_pruning_checkpoint
from drpruning.export.dense import dense_export
from drpruning.export.write import SUMMARY_FILE, check_out_dir, save_export


def export_run(
    checkpoint_or_run_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    num_verify_sequences: int = 4,
    tokenizer: str | Path | None = None,
) -> Path:
    """Export a pruning run's checkpoint to a standard HF directory; returns `out_dir`.

    Writes into a temporary sibling folder and renames it at the end, so a failure (including a failed
    logit check) leaves nothing that looks like a finished export.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, Path(checkpoint_or_run_dir))
    preflight(out_dir)  # writable, before anything is loaded
    loaded = load_pruning_checkpoint(checkpoint_or_run_dir)  # memory-mapped: the folding below is the long part
    preflight(out_dir, need_bytes=loaded.l0_module.target.num_params() * 4)  # fp32 weights
    dense, summary = dense_export(loaded.model, loaded.l0_module, source=loaded.source, step=loaded.step,
                                  verify=verify, num_verify_sequences=num_verify_sequences)  # fmt: skip
    summary["checkpoint"] = str(loaded.path)
    del loaded.model, loaded.l0_module  # the source is not needed for writing; free it before serialising
    gc.collect()
    return save_export(dense, summary, out_dir, overwrite=overwrite, tokenizer=tokenizer, source=loaded.source,
                       embedded_tokenizer=loaded.embedded_tokenizer, input_path=checkpoint_or_run_dir)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a DRPruning run's masks as a dense Hugging Face model.")
    parser.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint file, or sharded dir")
    parser.add_argument("out_dir", help="output HF model directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT_DIR (a folder holding anything else is refused)")
    parser.add_argument("--no-verify", action="store_true", help="skip the masked-vs-dense logit check")
    parser.add_argument("--tokenizer", help="tokenizer dir to copy (default: the one saved in the checkpoint, else the source "
                        "model's); it must be the tokenizer the run used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_run(args.checkpoint, args.out_dir, overwrite=args.overwrite, verify=not args.no_verify,
                         tokenizer=args.tokenizer)  # fmt: skip
    except (ExportError, ConfigError) as error:
        return report_error(error)
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    print(f"wrote {out}: {summary['params_before']:,} → {summary['params_after']:,} parameters, "
          f"shape {summary['exported_shape']}")  # fmt: skip
    return 0
