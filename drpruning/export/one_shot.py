"""One-shot structured pruning: a dense HF model of the target shape from importance alone (no training).

The baseline that pruning runs are compared with (Minitron, LLM-Pruner and Torch-Pruning rank units this
way). It takes exactly the path a run with `l0_module.init: importance` takes before its first step, the
same calibration pass (`drpruning.pruning.importance.calibrate`) and the same gate ordering
(`L0Module.order_gates_`), and exports through the checkpoint exporter's code (`dense_export`,
`save_export`): same unit selection, same `pruning.json`, same logit verification.

    python scripts/one_shot_prune.py SOURCE OUT --data DATA_DIR \\
        --target n_layers=20 hidden_size=384 n_heads=6 n_kv_heads=2 intermediate_size=1024
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from drpruning.atomic import preflight
from drpruning.errors import ConfigError, ExportError, ShapeError, report_error
from drpruning.export.dense import dense_export
from drpruning.export.write import check_out_dir, save_export
from drpruning.pruning.calibration import LAYER_MEASURES, CalibrationConfig
from drpruning.pruning.importance import calibrate
from drpruning.pruning.masks import IMPORTANCE_BAND, L0Module
from drpruning.pruning.shapes import PRUNING_MODULES, TARGET_KEYS, ModelShape

log = logging.getLogger(__name__)


def one_shot_prune(
    source: str | Path,
    target: Mapping[str, int],
    calibration: CalibrationConfig,
    out_dir: str | Path,
    *,
    pruning_modules: Sequence[str] = PRUNING_MODULES,
    overwrite: bool = False,
    verify: bool = True,
    num_verify_sequences: int = 4,
) -> Path:
    """Prune the HF model in `source` to `target` by importance and write it to `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, Path(source))
    preflight(out_dir)  # writable, before the model is loaded
    if not (Path(source) / "config.json").is_file():
        raise ExportError(f"{source} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32).eval()
    l0_module = L0Module(ModelShape.from_hf_config(model.config), target, pruning_modules, init="importance",
                         init_band=IMPORTANCE_BAND)  # fmt: skip
    preflight(out_dir, need_bytes=l0_module.target.num_params() * 4)  # before the calibration pass
    importance = calibrate(model, calibration, source=str(source))
    l0_module.order_gates_(importance.scores)
    dense, summary = dense_export(model, l0_module, source=str(source), step=0, verify=verify,
                                  num_verify_sequences=num_verify_sequences)  # fmt: skip
    summary["method"] = "one-shot importance"
    summary["importance"] = {
        "layer_measure": importance.layer_measure,
        "calibration": importance.meta["calibration"],
        "sequences_per_domain": importance.meta["sequences_per_domain"],
        "cost": importance.cost(),
    }
    return save_export(dense, summary, out_dir, overwrite=overwrite, source=str(source), input_path=source)


def parse_target(items: Sequence[str]) -> dict[str, int]:
    """`KEY=VALUE` items (keys of `TARGET_KEYS`) as a target dict."""
    target: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in TARGET_KEYS or not value.isdigit():
            raise ShapeError(f"--target item {item!r} must be KEY=INTEGER with KEY one of {', '.join(TARGET_KEYS)}")
        target[key] = int(value)
    return target


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="One-shot importance pruning of a Llama/Qwen2 HF model to a "
                                                 "target shape (no training); writes a dense HF model.")  # fmt: skip
    parser.add_argument("source", help="source HF model folder")
    parser.add_argument("out_dir", help="output HF model folder")
    parser.add_argument("--target", nargs="+", required=True, metavar="KEY=VALUE",
                        help=f"target shape, keys {', '.join(TARGET_KEYS)} (left out: the source's)")
    parser.add_argument("--data", required=True, help="calibration data: a prepare_data folder")
    parser.add_argument("--num-sequences", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--domains", nargs="+", help="calibration domains (default: all in the manifest)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--layer-measure", choices=LAYER_MEASURES, default="cosine")
    parser.add_argument("--device", help="where the calibration pass runs (default: CUDA when available)")
    parser.add_argument("--pruning-modules", nargs="+", default=list(PRUNING_MODULES), choices=PRUNING_MODULES)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-verify", action="store_true", help="skip the masked-vs-dense logit check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings: dict[str, Any] = dict(
            data_dir=args.data, num_sequences=args.num_sequences, seed=args.seed, batch_size=args.batch_size,
            max_seq_len=args.max_seq_len, domains=args.domains, split=args.split,
            layer_measure=args.layer_measure, device=args.device,
        )  # fmt: skip
        out = one_shot_prune(args.source, parse_target(args.target), CalibrationConfig.from_dict(settings),
                             args.out_dir, pruning_modules=args.pruning_modules, overwrite=args.overwrite,
                             verify=not args.no_verify)  # fmt: skip
    except (ExportError, ConfigError) as error:
        return report_error(error)
    summary = json.loads((out / "pruning.json").read_text(encoding="utf-8"))
    cost = summary["importance"]["cost"]
    print(f"wrote {out}: {summary['params_before']:,} → {summary['params_after']:,} parameters, shape "
          f"{summary['exported_shape']}; calibration {cost['sequences']} sequences, {cost['seconds']:.1f} s "
          f"on {cost['device']}")  # fmt: skip
    return 0
