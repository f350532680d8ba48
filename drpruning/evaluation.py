"""Per-domain loss and perplexity of any Hugging Face causal LM on a `prepare_data` folder.

The loss is the token-level mean cross-entropy over every predicted token of the domain's eval split
(position t predicts token t+1; the first token of each packed sequence is never a target), which is
what LLM-Foundry's `LanguageCrossEntropy` reports for the same sequences during training, so numbers from
`scripts/eval_domains.py` and from the `eval/<domain>` metrics of a run compare directly.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from drpruning.data.checks import check_tokenizer
from drpruning.data.manifest import load_manifest, open_split
from drpruning.errors import ConfigError, DataDirError, report_error
from drpruning.losses import next_token_losses

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_domain_sequences(
    data_dir: str | Path, domain: str, split: str = "eval", max_sequences: int | None = None
) -> np.ndarray:
    """The packed token sequences [N, seq_len] of one domain's split, in stored order."""
    dataset = open_split(data_dir, load_manifest(data_dir), domain, split)
    count = len(dataset) if max_sequences is None else min(len(dataset), max_sequences)
    if count == 0:
        raise ConfigError(f"{dataset.local} holds no sequences")
    return np.stack([np.asarray(dataset[i]["tokens"], dtype=np.int64) for i in range(count)])


@torch.no_grad()
def sequence_loss_sums(model: PreTrainedModel, tokens: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) of a batch of full sequences [B, S]."""
    token_loss, counted = next_token_losses(model(input_ids=tokens, use_cache=False).logits, tokens)
    return float(token_loss.sum()), int(counted.sum())


def _load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    if not (Path(model_dir) / "config.json").is_file():
        raise DataDirError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype).to(device)


def _model_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model folder (exports and source models carry one), else None."""
    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def evaluate_domains(
    model_dir_or_model: str | Path | PreTrainedModel,
    data_dir: str | Path,
    domains: Sequence[str] | None = None,
    split: str = "eval",
    max_sequences: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Per-domain loss / perplexity / token count, the unweighted average loss, and the worst domain.

    `domains` defaults to every domain of the manifest (in its order); `max_sequences` caps the sequences
    per domain (the first ones, so runs compare on the same data). The data must have been tokenized with
    the model's tokenizer: `tokenizer`, else the one saved in the model folder (if neither, a warning).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    manifest = load_manifest(data_dir)
    selected = [entry["name"] for entry in manifest["domains"]] if domains is None else list(domains)
    if not selected:
        raise ConfigError("no domains to evaluate")
    target_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model_dir_or_model, str | Path):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if tokenizer is None:
            tokenizer = _model_tokenizer(model_dir_or_model)
            if tokenizer is None and (Path(model_dir_or_model) / "config.json").is_file():
                warnings.warn(f"{model_dir_or_model} holds no tokenizer, so nothing checks that {data_dir} was "
                              "tokenized for this model", stacklevel=2)  # fmt: skip
        if tokenizer is not None:
            check_tokenizer(manifest, data_dir, tokenizer, "")
        model = _load_model(model_dir_or_model, target_device, DTYPES[dtype])
        model_name = str(model_dir_or_model)
    else:
        if tokenizer is not None:
            check_tokenizer(manifest, data_dir, tokenizer, "")
        model = model_dir_or_model
        target_device = next(model.parameters()).device
        model_name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    if manifest["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"{data_dir} was tokenized with {manifest['vocab_size']} token ids but the model's "
                          f"vocabulary has {model.config.vocab_size}")
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float | int]] = {}
    try:
        for domain in selected:
            sequences = load_domain_sequences(data_dir, domain, split, max_sequences)
            loss_sum, tokens = 0.0, 0
            for start in range(0, len(sequences), batch_size):
                batch = torch.from_numpy(sequences[start:start + batch_size]).to(target_device)
                batch_loss, batch_tokens = sequence_loss_sums(model, batch)
                loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
            loss = loss_sum / tokens
            results[domain] = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens,
                               "sequences": len(sequences)}
    finally:
        model.train(was_training)
    worst = max(results, key=lambda d: results[d]["loss"])
    return {
        "model": model_name,
        "data_dir": str(data_dir),
        "split": split,
        "domains": results,
        "average_loss": float(np.mean([r["loss"] for r in results.values()])),
        "worst_domain": {"name": worst, "loss": results[worst]["loss"]},
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'domain':<16} {'loss':>8} {'ppl':>10} {'tokens':>12}"]
    for domain, r in report["domains"].items():
        rows.append(f"{domain:<16} {r['loss']:>8.4f} {r['perplexity']:>10.3f} {r['tokens']:>12d}")
    rows.append(f"{'average':<16} {report['average_loss']:>8.4f}")
    rows.append(f"worst domain: {report['worst_domain']['name']} ({report['worst_domain']['loss']:.4f})")
    return "\n".join(rows)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-domain loss and perplexity of a Hugging Face causal LM on a prepare_data eval split.")
    parser.add_argument("model_dir", help="Hugging Face model folder (e.g. scripts/prune_to_dense.py output)")
    parser.add_argument("data_dir", help="scripts/prepare_data.py output folder (with manifest.json)")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--domains", nargs="+", help="domains to evaluate (default: all in the manifest)")
    parser.add_argument("--split", default="eval", help="split to read (default: eval)")
    parser.add_argument("--max-sequences", type=int, help="cap on sequences per domain (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights dtype")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (scripts/eval_domains.py); returns the process exit code."""
    args = build_arg_parser().parse_args(argv)
    try:
        report = evaluate_domains(args.model_dir, args.data_dir, domains=args.domains, split=args.split,
                                  max_sequences=args.max_sequences, batch_size=args.batch_size,
                                  device=args.device, dtype=args.dtype)
    except ConfigError as error:
        return report_error(error, prog="eval_domains")
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
