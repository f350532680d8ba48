"""LLM-Foundry config transform: one labelled stock `text` evaluator per domain from a short block.

    eval_loader: {name: domain_eval, data_dir: DIR, domains: [a, b], split: eval}

becomes `eval_loaders: [{label: a, name: text, dataset: {local: DIR/a, split: eval, ...}}, ...]`, so the
evaluators are labelled `eval/<domain>` and `state.eval_metrics['eval/<domain>']` holds each domain's loss.
Using foundry's own loader keeps eval batches and metrics exactly as foundry computes them. With
`remote: URL` (any remote streaming reads), each loader gets `remote: URL/a` and DIR is the local cache
that streaming downloads the eval shards into (the manifest is fetched first, see drpruning/data/remote.py).

Foundry runs every registered transform on every train config (after moving a list-valued `eval_loader` to
`eval_loaders`), so configs without a `domain_eval` block are returned unchanged. `eval_from_yaml` applies
no plugin transforms; there, list the expanded loaders directly (see `domain_eval_loaders`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from drpruning.data.checks import check_seq_len, check_tokenizer, tokenizer_from_config
from drpruning.data.manifest import load_manifest, select_domains, split_folder
from drpruning.data.remote import fetch_manifest, join_remote
from drpruning.errors import ConfigError

BLOCK_NAME = "domain_eval"
_BLOCK_KEYS = {
    "name", "data_dir", "domains", "split", "max_seq_len", "num_workers", "prefetch_factor",
    "persistent_workers", "pin_memory", "remote",
}


def domain_eval_loaders(
    data_dir: str | Path,
    max_seq_len: int,
    domains: Sequence[str] | None = None,
    split: str = "eval",
    num_workers: int = 0,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    remote: str | None = None,
) -> list[dict[str, Any]]:
    """Stock `text` loader configs, one per domain, labelled by domain.

    Args (also the keys of a `domain_eval` block, besides its `name`):
        data_dir: a `prepare_data` output folder, or with `remote` the local cache of the one at `remote`.
        max_seq_len: must equal the prepared length (default in a block: the config's `max_seq_len`).
        domains: the domains to evaluate (default: all, in manifest order).
        split: the prepared split to read (`eval`, or `train` to measure training loss).
        num_workers, prefetch_factor, persistent_workers, pin_memory: as for `torch.utils.data.DataLoader`.
        tokenizer: the run's tokenizer, checked against the one the data was prepared with, when given.
        remote: any location mosaicml-streaming reads (s3://, gs://, a shared path, ...).
    """
    if remote is not None:
        fetch_manifest(remote, data_dir)
    manifest = load_manifest(data_dir)
    try:
        selected = select_domains(manifest, domains, data_dir)
    except ValueError as error:
        raise ConfigError(f"domain_eval: {error}") from None
    check_seq_len(manifest, data_dir, max_seq_len, "domain_eval")
    if tokenizer is not None:
        check_tokenizer(manifest, data_dir, tokenizer, "domain_eval")
    loaders = []
    for domain in selected:
        if remote is None:  # streaming reads it; check first what it would fail on less clearly
            try:
                split_folder(data_dir, manifest, domain, split)
            except ConfigError as error:
                raise type(error)(f"domain_eval: {error}") from None
        multiprocess = num_workers > 0
        loaders.append({
            "label": domain,
            "name": "text",
            "dataset": {
                "local": str(Path(data_dir) / domain),
                **({} if remote is None else {"remote": join_remote(remote, domain)}),
                "split": split,
                "shuffle": False,
                "max_seq_len": max_seq_len,
            },
            "drop_last": False,
            "num_workers": num_workers,
            # torch rejects these two options without worker processes
            "prefetch_factor": prefetch_factor if multiprocess else None,
            "persistent_workers": persistent_workers and multiprocess,
            "pin_memory": pin_memory,
        })
    return loaders


def _is_block(loader: Any) -> bool:
    return isinstance(loader, dict) and loader.get("name") == BLOCK_NAME


def _expand(block: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = sorted(set(block) - _BLOCK_KEYS)
    if unknown:
        raise ConfigError(f"domain_eval: unknown key(s) {unknown}; allowed: {sorted(_BLOCK_KEYS)}")
    if "data_dir" not in block:
        raise ConfigError("domain_eval: `data_dir` (a prepare_data output folder) is required")
    options = {k: v for k, v in block.items() if k not in ("name", "data_dir")}
    options.setdefault("max_seq_len", cfg.get("max_seq_len"))
    if options["max_seq_len"] is None:
        raise ConfigError("domain_eval: set `max_seq_len` in the block or at the top level of the config")
    return domain_eval_loaders(block["data_dir"], **options, tokenizer=tokenizer_from_config(cfg))


def expand_domain_eval(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replace `domain_eval` blocks in `eval_loader` / `eval_loaders` with per-domain `text` loaders."""
    loader = cfg.get("eval_loader")
    loaders = cfg.get("eval_loaders")
    has_block = _is_block(loader) or any(
        _is_block(entry) for group in (loader, loaders) if isinstance(group, list) for entry in group
    )
    if not has_block:
        return cfg
    cfg = copy.deepcopy(cfg)
    if _is_block(loader):
        # A single block becomes several loaders; foundry expects multiple loaders under `eval_loaders`.
        if cfg.get("eval_loaders"):
            raise ConfigError("domain_eval: set either `eval_loader` or `eval_loaders`, not both")
        cfg.pop("eval_loader")
        cfg["eval_loaders"] = _expand(loader, cfg)
        return cfg
    for key in ("eval_loader", "eval_loaders"):
        if isinstance(cfg.get(key), list):
            expanded: list[dict[str, Any]] = []
            for entry in cfg[key]:
                expanded.extend(_expand(entry, cfg) if _is_block(entry) else [entry])
            labels = [entry.get("label") for entry in expanded]
            duplicates = sorted({label for label in labels if labels.count(label) > 1 and label is not None})
            if duplicates:
                raise ConfigError(f"domain_eval: evaluator label(s) {duplicates} appear more than once")
            cfg[key] = expanded
    return cfg
