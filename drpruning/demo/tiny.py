"""Tiny offline assets for tests and the CPU recipes: a trained byte-level tokenizer, a multi-domain
corpus prepared into MDS, and 4-layer random Llama / Qwen2 source models (no downloads)."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from drpruning.atomic import refuse_foreign_folder, staged_directory
from drpruning.data.prepare import prepare_data

TINY_DOMAINS: tuple[str, ...] = ("prose", "code", "math", "facts")
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "</s>", "<unk>"

_ADJECTIVES = ["quiet", "bright", "old", "small", "brave", "gentle", "curious", "tired", "happy", "dark"]
_NOUNS = ["fox", "garden", "river", "teacher", "lantern", "village", "sailor", "letter", "window", "horse"]
_VERBS = ["watched", "found", "followed", "painted", "carried", "remembered", "visited", "opened"]
_PLACES = ["the hill", "the market", "the old bridge", "the forest", "the harbour", "the library"]
_IDENTIFIERS = ["total", "count", "value", "items", "result", "index", "buffer", "scale", "offset"]
_OPERATORS = ["+", "-", "*", "//", "%"]
_COUNTRIES = [
    ("France", "Paris", "euro"), ("Japan", "Tokyo", "yen"), ("Kenya", "Nairobi", "shilling"),
    ("Peru", "Lima", "sol"), ("Norway", "Oslo", "krone"), ("Egypt", "Cairo", "pound"),
    ("Canada", "Ottawa", "dollar"), ("India", "New Delhi", "rupee"),
]


def _prose_document(rng: np.random.Generator) -> str:
    sentences = []
    for _ in range(int(rng.integers(3, 9))):
        sentences.append(
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_NOUNS)} near {rng.choice(_PLACES)}."
        )
    return " ".join(sentences)


def _code_document(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(1, 4))):
        name, arg = rng.choice(_IDENTIFIERS), rng.choice(_IDENTIFIERS)
        lines += [
            f"def compute_{name}({arg}, step={int(rng.integers(1, 9))}):",
            f"    {name} = {arg} {rng.choice(_OPERATORS)} {int(rng.integers(2, 100))}",
            f"    if {name} > {int(rng.integers(0, 50))}:",
            f"        return {name} {rng.choice(_OPERATORS)} step",
            f"    return {name}",
            "",
        ]
    return "\n".join(lines)


def _math_document(rng: np.random.Generator) -> str:
    facts = []
    for _ in range(int(rng.integers(4, 12))):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        facts.append(f"{a} + {b} = {a + b}." if rng.random() < 0.5 else f"{a} * {b} = {a * b}.")
    return " ".join(facts)


def _facts_document(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(2, 6))):
        country, capital, currency = _COUNTRIES[int(rng.integers(len(_COUNTRIES)))]
        lines.append(f"Q: What is the capital of {country}? A: {capital}.")
        lines.append(f"Q: Which currency is used in {country}? A: the {currency}.")
    return "\n".join(lines)


_GENERATORS: dict[str, Callable[[np.random.Generator], str]] = {
    "prose": _prose_document,
    "code": _code_document,
    "math": _math_document,
    "facts": _facts_document,
}


def tiny_documents(domain: str, count: int, seed: int = 0) -> list[str]:
    """`count` synthetic documents of one tiny domain; a pure function of (domain, count, seed)."""
    if domain not in _GENERATORS:
        raise ValueError(f"unknown tiny domain {domain!r}; known: {', '.join(TINY_DOMAINS)}")
    rng = np.random.default_rng([seed, TINY_DOMAINS.index(domain)])
    return [_GENERATORS[domain](rng) for _ in range(count)]


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the tiny domains and save it so `AutoTokenizer.from_pretrained` loads it.

    Byte-level keeps every input encodable (no `<unk>` for unseen text), which matters because
    `prepare_data` also runs on arbitrary user text in the CPU recipes.
    """
    training_text = [doc for domain in TINY_DOMAINS for doc in tiny_documents(domain, 64, seed=12345)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=1 << 20,
    )
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_path))
    return hf_tokenizer


def make_tiny_corpus(
    out_dir: str | Path, n_domains: int = 3, docs_per_domain: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write `<domain>.jsonl.gz` files of clearly different synthetic text; returns domain -> file.

    The gzip header carries no timestamp or file name, so the bytes are reproducible.
    """
    if not 1 <= n_domains <= len(TINY_DOMAINS):
        raise ValueError(f"n_domains must be in [1, {len(TINY_DOMAINS)}], got {n_domains}")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for domain in TINY_DOMAINS[:n_domains]:
        lines = [json.dumps({"text": doc}) + "\n" for doc in tiny_documents(domain, docs_per_domain, seed)]
        path = out_path / f"{domain}.jsonl.gz"
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write("".join(lines).encode("utf-8"))
        files[domain] = path
    return files


def make_tiny_mds(
    root: str | Path,
    n_domains: int = 3,
    seq_len: int = 64,
    eval_sequences: int = 8,
    docs_per_domain: int = 200,
    installed_at: str | Path | None = None,
    shard_size_limit: int = 1 << 26,
) -> Path:
    """Tokenizer, corpus and prepared MDS set under `root` (`tokenizer/`, `corpus/`, `mds/`); returns `mds/`.

    One call gives tests and CPU recipes a complete `domain_mixture` / `domain_eval` data folder.
    `installed_at`: where `root` will be once renamed (the manifest records the paths there).
    `shard_size_limit`: bytes per MDS shard (small values give many shards, as remote-data tests need).
    """
    root_path = Path(root)
    make_tiny_tokenizer(root_path / "tokenizer")
    files = make_tiny_corpus(root_path / "corpus", n_domains=n_domains, docs_per_domain=docs_per_domain)
    prepare_data(
        {name: str(path) for name, path in files.items()},
        root_path / "tokenizer",
        root_path / "mds",
        seq_len=seq_len,
        eval_sequences=eval_sequences,
        shard_size_limit=shard_size_limit,
        overwrite=True,
        show_progress=False,
        relocate=None if installed_at is None else (root_path.resolve(), Path(installed_at).resolve()),
    )
    return root_path / "mds"


# ---- tiny random source models ---------------------------------------------------------------------------

TINY_KINDS = ("llama_mha", "llama_gqa", "qwen2", "mistral", "qwen3")


def tiny_config(kind: str, vocab_size: int = 512, **overrides: Any) -> PretrainedConfig:
    """A 4-layer, d=64 decoder. `llama_gqa`: 8 heads / 2 KV groups; `qwen2`: q/k/v biases, tied embeddings;
    `mistral`: 2 KV groups; `qwen3`: 2 KV groups, q/k norms over head_dim, tied embeddings."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    if kind == "llama_mha":
        config = LlamaConfig(**{**common, "num_key_value_heads": 8, "tie_word_embeddings": False, **overrides})
    elif kind == "llama_gqa":
        config = LlamaConfig(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": False, **overrides})
    elif kind == "qwen2":
        config = Qwen2Config(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                 "sliding_window": None, **overrides})
    elif kind == "mistral":
        config = MistralConfig(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": False,
                                   "sliding_window": None, **overrides})
    elif kind == "qwen3":
        config = Qwen3Config(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                 "sliding_window": None, **overrides})
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS}")
    return config


def tiny_model(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny model; Qwen2 biases get random values so bias handling is exercised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def save_tiny_model(kind: str, out_dir: str | Path, vocab_size: int, seed: int = 0) -> Path:
    out = Path(out_dir)
    tiny_model(kind, seed=seed, vocab_size=vocab_size).save_pretrained(out)
    return out


def make_tiny_assets(out: str | Path, seq_len: int = 64) -> Path:
    """`tokenizer/`, `llama_gqa/`, `qwen2/` (HF dirs with the tokenizer), `corpus/`, `mds/` under `out`.

    Built in a sibling folder and renamed at the end, so a complete folder is never half-written.
    """
    out = Path(out)
    if (out / ".complete").exists():
        return out
    refuse_foreign_folder(out, ".complete", "tiny assets")
    with staged_directory(out) as work:  # an empty folder or nothing: a foreign folder was refused above
        make_tiny_mds(work, n_domains=4, seq_len=seq_len, eval_sequences=8, docs_per_domain=300, installed_at=out)
        vocab_size = len(AutoTokenizer.from_pretrained(work / "tokenizer"))
        for kind in ("llama_gqa", "qwen2"):
            save_tiny_model(kind, work / kind, vocab_size=vocab_size)
            shutil.copytree(work / "tokenizer", work / kind, dirs_exist_ok=True)
        (work / ".complete").touch()
    return out
