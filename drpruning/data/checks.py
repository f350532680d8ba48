"""Checks where prepared data meets a model: same tokenizer, same sequence length.

Token ids only mean something under the tokenizer that produced them. A vocabulary-size check lets any
tokenizer with at least as many ids through (SmolLM2 scored on another tokenizer's ids reports a perplexity
of thousands without a word), so `prepare_data` records a fingerprint of the tokenizer in `manifest.json`
and the train loader, the per-domain eval loaders and `scripts/eval_domains.py` compare it with the
tokenizer of the run or model. Manifests written before the fingerprint existed get a warning, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from drpruning.errors import ConfigError

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "tokenizer_fingerprint"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """`sha256:<hex>` of the vocabulary (token → id, added and special tokens included) and the EOS token.

    Independent of where the tokenizer was loaded from, so a copy saved next to an exported model matches
    the original; any change of a token's id, or of the document separator, changes it.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps({"vocab": vocab, "eos_token": tokenizer.eos_token}, ensure_ascii=False,
                         separators=(",", ":"))  # fmt: skip
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_tokenizer(manifest: Mapping[str, Any], data_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                    where: str) -> None:  # fmt: skip
    """Refuse data tokenized with another tokenizer than `tokenizer`; warn when the manifest cannot tell.

    `where` names the component that checks (a message prefix), or is empty.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    where = f"{where}: " if where else ""
    vocab_size = int(manifest.get("vocab_size", 0))
    if vocab_size > len(tokenizer):
        raise ConfigError(f"{where}{data_dir} was tokenized with a vocabulary of {vocab_size} tokens but the "
                          f"tokenizer {name} has {len(tokenizer)}")  # fmt: skip
    expected = manifest.get(FINGERPRINT_KEY)
    if expected is None:
        warnings.warn(f"{where}{data_dir}/manifest.json predates tokenizer fingerprints, so nothing checks "
                      f"that it was tokenized with {name}; run scripts/prepare_data.py again to record one",
                      stacklevel=2)  # fmt: skip
        return
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise ConfigError(
            f"{where}{data_dir} was tokenized with another tokenizer ({manifest.get('tokenizer')}, "
            f"{vocab_size} tokens, {expected[:19]}…) than {name} ({len(tokenizer)} tokens, {actual[:19]}…): "
            f"its token ids would be read as different text. Prepare the data with --tokenizer {name}"
        )


def check_seq_len(manifest: Mapping[str, Any], data_dir: str | Path, max_seq_len: int, where: str) -> None:
    """`max_seq_len` must equal the prepared length: shorter silently cuts every sequence, longer cannot be met."""
    seq_len = int(manifest["seq_len"])
    fix = f"set max_seq_len: {seq_len}, or prepare the data again with --seq-len {max_seq_len}"
    if max_seq_len < seq_len:
        raise ConfigError(f"{where}: max_seq_len {max_seq_len} is shorter than the seq_len {seq_len} that {data_dir} "
                          f"was prepared with, so only the first {max_seq_len} tokens of every sequence would be "
                          f"used; {fix}")  # fmt: skip
    if max_seq_len > seq_len:
        raise ConfigError(f"{where}: max_seq_len {max_seq_len} exceeds the prepared seq_len {seq_len} of {data_dir}; "
                          f"{fix}")  # fmt: skip


@functools.lru_cache(maxsize=8)
def _local_tokenizer(name: str) -> PreTrainedTokenizerBase | None:
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        log.info("cannot load tokenizer %s offline to check the eval data against it: %s", name, error)
        return None


def tokenizer_from_config(cfg: Mapping[str, Any]) -> PreTrainedTokenizerBase | None:
    """The run's tokenizer (`tokenizer.name` of a train config) if it loads offline, else None (not checked)."""
    spec = cfg.get("tokenizer")
    name = spec.get("name") if isinstance(spec, Mapping) else None
    return _local_tokenizer(str(name)) if name else None
