"""Text / jsonl → tokenized, packed, per-domain MDS shards with a train and a held-out eval split.

Layout written under OUT_DIR (see `prepare_data`):

    OUT_DIR/manifest.json          domains in order, counts per split, seq_len, tokenizer, token dtype
    OUT_DIR/<domain>/train/        MDS, column `tokens` (ndarray:uint16 or ndarray:uint32), seq_len each
    OUT_DIR/<domain>/eval/         same format, exactly `eval_sequences` sequences

Documents are tokenized without special tokens and each is followed by EOS; the token stream of a domain
is cut into fixed-length sequences (the tail that does not fill one is dropped). The eval split is the
first `eval_sequences` sequences of the domain (files in sorted order); the rest of the document that
completes the eval split is dropped, so no document is shared between eval and train.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class DataPrepError(ValueError):
    """Bad input to data preparation; the message names the offending file, domain or option."""


@dataclass
class SplitStats:
    """Counts of one split of one domain, as written to the manifest."""

    documents: int = 0
    sequences: int = 0
    tokens: int = 0


@dataclass
class _DomainResult:
    files: list[Path]
    train: SplitStats = field(default_factory=SplitStats)
    eval: SplitStats = field(default_factory=SplitStats)
    dropped_tokens: int = 0


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id (halves disk and page cache for <65k vocabularies)."""
    return np.dtype(np.uint16) if vocab_size - 1 <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read `data_dir/manifest.json`, failing with a message that says how such a folder is made."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {data_dir}: expected a folder written by scripts/prepare_data.py"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def select_domains(manifest: dict[str, Any], domains: Sequence[str] | None, data_dir: str | Path) -> list[str]:
    """`domains` (default: all, in manifest order) checked against a prepared folder's manifest."""
    known = [entry["name"] for entry in manifest["domains"]]
    selected = list(known if domains is None else domains)
    unknown = [d for d in selected if d not in known]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown} in {data_dir}; known domains: {known}")
    if not selected or len(set(selected)) != len(selected):
        raise ValueError(f"domains must be a non-empty list without repeats, got {selected}")
    return selected


def parse_domain_arg(arg: str) -> tuple[str, str]:
    """Split a CLI `NAME=PATTERN` argument."""
    name, sep, pattern = arg.partition("=")
    if not sep or not pattern:
        raise DataPrepError(f"--domain expects NAME=PATH_OR_GLOB, got {arg!r}")
    return name, pattern


def validate_domain_name(name: str) -> None:
    """Domain names become folder names, yaml keys and metric labels, so they must be plain identifiers."""
    if not name.isidentifier():
        raise DataPrepError(f"domain name {name!r} is not a valid identifier (letters, digits, _; no leading digit)")


def resolve_domain_files(name: str, patterns: Sequence[str]) -> list[Path]:
    """Files of one domain in sorted order: folders give their .txt/.jsonl/.jsonl.gz files recursively,
    globs (with `**`) give every file they match, plain paths give themselves."""
    files: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)]
        elif path.is_file():
            matched = [path]
        else:
            matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        if not matched:
            raise DataPrepError(f"domain {name!r}: {pattern!r} matches no input files")
        files.update(p.resolve() for p in matched)
    return sorted(files, key=lambda p: p.as_posix())


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{where}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r})") from e


def _iter_jsonl_texts(stream: BinaryIO, path: Path) -> Iterator[str]:
    for line_number, raw_line in enumerate(stream, start=1):
        where = f"{path}:{line_number}"
        line = _decode_utf8(raw_line, where).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataPrepError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or "text" not in record:
            raise DataPrepError(f"{where}: line has no 'text' field")
        if not isinstance(record["text"], str):
            raise DataPrepError(f"{where}: 'text' is {type(record['text']).__name__}, expected a string")
        yield record["text"]


def iter_file_documents(path: Path) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the file read so far); empty documents are skipped."""
    with open(path, "rb") as raw:
        if path.name.endswith(".jsonl.gz"):
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    for text in _iter_jsonl_texts(gz, path):
                        if text.strip():
                            yield text, raw.tell()
            except (OSError, EOFError) as e:
                raise DataPrepError(f"{path}: cannot decompress ({e})") from e
        elif path.name.endswith(".jsonl"):
            for text in _iter_jsonl_texts(raw, path):
                if text.strip():
                    yield text, raw.tell()
        else:
            text = _decode_utf8(raw.read(), str(path))
            if text.strip():
                yield text, raw.tell()


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer directory (never the Hub: prep must be reproducible offline)."""
    if not Path(tokenizer_dir).is_dir():
        raise DataPrepError(f"tokenizer directory not found: {tokenizer_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise DataPrepError(f"tokenizer {tokenizer_dir} has no EOS token, needed to join documents")
    return tokenizer


class _SequencePacker:
    """Concatenates token arrays and hands out full `seq_len` sequences; the remainder waits for more."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens < self.seq_len:
            return []
        stream = np.concatenate(self._pending)
        full = len(stream) // self.seq_len * self.seq_len
        rest = stream[full:]
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)
        return list(stream[:full].reshape(-1, self.seq_len))

    def discard(self) -> int:
        """Drop the unfinished sequence and return how many tokens that threw away."""
        dropped = self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        return dropped


def _tokenized_documents(
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerBase,
    dtype: np.dtype,
    batch_documents: int,
    progress: tqdm,
) -> Iterator[np.ndarray]:
    """Token arrays (document + EOS) in file order; tokenizer calls are batched for throughput."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    done_bytes = 0
    for path in files:
        batch: list[str] = []
        position = 0
        for text, position in iter_file_documents(path):
            batch.append(text)
            if len(batch) == batch_documents:
                yield from _encode_batch(batch, tokenizer, dtype, eos)
                batch = []
                progress.update(done_bytes + position - progress.n)
        if batch:
            yield from _encode_batch(batch, tokenizer, dtype, eos)
        done_bytes += path.stat().st_size
        progress.update(done_bytes - progress.n)


def _encode_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, eos: np.ndarray
) -> Iterator[np.ndarray]:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for ids in encoded:
        yield np.concatenate([np.asarray(ids, dtype=dtype), eos])


def _write_domain(
    name: str,
    files: list[Path],
    tokenizer: PreTrainedTokenizerBase,
    dtype: np.dtype,
    seq_len: int,
    eval_sequences: int,
    domain_dir: Path,
    batch_documents: int,
    shard_size_limit: int,
    show_progress: bool,
) -> _DomainResult:
    result = _DomainResult(files=files)
    columns = {"tokens": f"ndarray:{dtype.name}"}
    packer = _SequencePacker(seq_len)
    total_bytes = sum(p.stat().st_size for p in files)
    with (
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc=name, disable=not show_progress) as progress,
        MDSWriter(out=str(domain_dir / "eval"), columns=columns, size_limit=shard_size_limit) as eval_writer,
        MDSWriter(out=str(domain_dir / "train"), columns=columns, size_limit=shard_size_limit) as train_writer,
    ):
        for tokens in _tokenized_documents(files, tokenizer, dtype, batch_documents, progress):
            filling_eval = result.eval.sequences < eval_sequences
            split = result.eval if filling_eval else result.train
            split.documents += 1
            for sequence in packer.add(tokens):
                if filling_eval and result.eval.sequences == eval_sequences:
                    result.dropped_tokens += len(sequence)
                    continue
                (eval_writer if filling_eval else train_writer).write({"tokens": sequence})
                split.sequences += 1
            if filling_eval and result.eval.sequences == eval_sequences:
                result.dropped_tokens += packer.discard()
        result.dropped_tokens += packer.discard()
    if result.eval.documents == 0:
        raise DataPrepError(f"domain {name!r}: no non-empty documents in {len(files)} file(s)")
    if result.eval.sequences < eval_sequences or result.train.sequences == 0:
        available = result.eval.sequences + result.train.sequences
        raise DataPrepError(
            f"domain {name!r}: too little data: {available} full sequence(s) of {seq_len} tokens, "
            f"but the eval split needs {eval_sequences} and training at least 1 more"
        )
    result.eval.tokens = result.eval.sequences * seq_len
    result.train.tokens = result.train.sequences * seq_len
    return result


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataPrepError(f"output folder {out_dir} is not empty; pass --overwrite to replace it")


def _replace_dir(finished: Path, target: Path) -> None:
    """Move a finished folder into place so readers never see a half-written OUT_DIR."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(finished, target)
        shutil.rmtree(old)
    else:
        os.replace(finished, target)


def prepare_data(
    domains: Mapping[str, str | Sequence[str]],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int,
    eval_sequences: int,
    overwrite: bool = False,
    batch_documents: int = 256,
    shard_size_limit: int = 1 << 26,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build the per-domain MDS dataset described in the module docstring and return its manifest.

    `domains` maps a name to a path, folder or glob (or a list of them); order is kept as domain order.
    """
    if not domains:
        raise DataPrepError("no domains given")
    if seq_len < 2:
        raise DataPrepError(f"seq_len must be at least 2, got {seq_len}")
    if eval_sequences < 1:
        raise DataPrepError(f"eval_sequences must be at least 1, got {eval_sequences}")
    sources = {name: [spec] if isinstance(spec, str | os.PathLike) else list(spec) for name, spec in domains.items()}
    for name in sources:
        validate_domain_name(name)
    out_path = Path(out_dir)
    _check_out_dir(out_path, overwrite)
    domain_files = {name: resolve_domain_files(name, [str(p) for p in specs]) for name, specs in sources.items()}
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype_for_vocab(len(tokenizer))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest_domains = []
        for name, files in domain_files.items():
            result = _write_domain(
                name, files, tokenizer, dtype, seq_len, eval_sequences, staging / name,
                batch_documents, shard_size_limit, show_progress,
            )
            manifest_domains.append({
                "name": name,
                "sources": [str(p) for p in sources[name]],
                "files": len(files),
                "train": {"path": f"{name}/train", **vars(result.train)},
                "eval": {"path": f"{name}/eval", **vars(result.eval)},
                "dropped_tokens": result.dropped_tokens,
            })
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "seq_len": seq_len,
            "eval_sequences": eval_sequences,
            "tokenizer": str(tokenizer_dir),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "token_dtype": dtype.name,
            "domains": manifest_domains,
        }
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _replace_dir(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize and pack per-domain text into MDS train/eval splits for the domain_mixture loader.",
    )
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    parser.add_argument("--eval-sequences", type=int, required=True, help="held-out sequences per domain")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument(
        "--domain", action="append", required=True, metavar="NAME=PATH_OR_GLOB",
        help="a domain and its input (folder, file or glob; repeat a NAME to add inputs); order = domain order",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--batch-documents", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--shard-size-limit", type=int, default=1 << 26, help="bytes per MDS shard")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (scripts/prepare_data.py); returns the process exit code."""
    args = build_arg_parser().parse_args(argv)
    try:
        domains: dict[str, list[str]] = {}
        for arg in args.domain:
            name, pattern = parse_domain_arg(arg)
            domains.setdefault(name, []).append(pattern)
        manifest = prepare_data(
            domains, args.tokenizer, args.out, args.seq_len, args.eval_sequences,
            overwrite=args.overwrite, batch_documents=args.batch_documents,
            shard_size_limit=args.shard_size_limit, show_progress=not args.no_progress,
        )
    except DataPrepError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    for domain in manifest["domains"]:
        print(
            f"{domain['name']}: {domain['train']['sequences']} train / {domain['eval']['sequences']} eval "
            f"sequences of {manifest['seq_len']} tokens ({domain['files']} files)"
        )
    print(f"wrote {args.out}")
    return 0
