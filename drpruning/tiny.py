"""Offline tiny assets (tokenizer and multi-domain corpus) for tests and CPU recipes.

Everything here is generated from code and fixed seeds, so tests never need the network and the same call
always produces the same bytes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from drpruning.data_prep import prepare_data

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
) -> Path:
    """Tokenizer, corpus and prepared MDS set under `root` (`tokenizer/`, `corpus/`, `mds/`); returns `mds/`.

    One call gives tests and CPU recipes a complete `domain_mixture` / `domain_eval` data folder.
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
        overwrite=True,
        show_progress=False,
    )
    return root_path / "mds"
