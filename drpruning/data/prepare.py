"""Text / jsonl → tokenized, packed, per-domain MDS shards with a train and a held-out eval split.

Layout written under OUT_DIR (see `prepare_data`):

    OUT_DIR/manifest.json          domains in order, counts per split, seq_len, tokenizer (path and
                                   fingerprint), token dtype
    OUT_DIR/<domain>/train/        MDS, column `tokens` (ndarray:uint16 or ndarray:uint32), seq_len each
    OUT_DIR/<domain>/eval/         same format, exactly `eval_sequences` sequences

Input files are read by `drpruning/data/sources.py`; the manifest is read back by `drpruning/data/manifest.py`.

Documents are tokenized without special tokens and each is followed by EOS; the token stream of a domain
(files in sorted order) is cut into fixed-length sequences. The eval split is the first `eval_sequences`
sequences of that stream and the train split the rest, so only the final partial sequence of each domain
is dropped; the one document that straddles the boundary starts in eval and continues in train (no token
is in both splits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from drpruning.atomic import is_scratch_name, replace_directory, scratch_parent, staged_directory
from drpruning.data.checks import FINGERPRINT_KEY, tokenizer_fingerprint
from drpruning.data.manifest import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    load_manifest,
    token_dtype_for_vocab,
)
from drpruning.data.sources import (
    iter_file_documents,
    parse_domain_arg,
    resolve_domain_files,
    validate_domain_name,
)
from drpruning.errors import ConfigError, DataPrepError, report_error

# Written into every split's index.json; a remote reader checks each shard it downloads against it
# (drpruning/data/remote.py), so a damaged copy of the same size is caught. xxh64: fast, and what streaming names it.
SHARD_HASHES = ("xxh64",)


@dataclass
class SplitStats:
    """Counts of one split of one domain, as written to the manifest (`documents`: those starting in it)."""

    documents: int = 0
    sequences: int = 0
    tokens: int = 0


@dataclass
class _DomainResult:
    files: list[Path]
    train: SplitStats = field(default_factory=SplitStats)
    eval: SplitStats = field(default_factory=SplitStats)
    documents: int = 0
    dropped_tokens: int = 0
    replaced_surrogates: int = 0


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


# A tokenizer call's memory grows with its input (about 150x the text for a fast tokenizer): documents longer
# than PIECE_CHARS are tokenized in pieces, and a batch holds at most BATCH_CHARS of text, so memory stays
# bounded whatever the document length (benchmarks/README.md: prepare_data memory).
PIECE_CHARS = 1 << 20
BATCH_CHARS = 4 << 20


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most about `size` characters, each cut where whitespace follows a
    non-space character (a line break when there is one in the last half of the piece).

    Pre-tokenizers of byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) never join a non-space character
    with the whitespace after it, so the pieces' tokens are exactly the whole text's; a piece with no such
    place is cut at `size` (a run of `size` characters without a space)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = -1
        for separators in ("\n", " \t\r\f\v"):
            cut = max(i for i in (_last_cut(text, start + size // 2, end, c) for c in separators))
            if cut > start:
                break
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _last_cut(text: str, low: int, high: int, char: str) -> int:
    """The last index i in (low, high] with text[i] == char and text[i - 1] not whitespace, else -1."""
    i = text.rfind(char, low, high + 1)
    while i > low:
        if not text[i - 1].isspace():
            return i
        i = text.rfind(char, low, i)
    return -1


def _tokenized_documents(
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerBase,
    dtype: np.dtype,
    batch_documents: int,
    progress: tqdm,
    counts: dict[str, int],
) -> Iterator[np.ndarray]:
    """Token arrays (document + EOS) in file order; tokenizer calls are batched for throughput."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    done_bytes = 0
    for path in files:
        batch: list[str] = []
        position = 0
        batch_chars = 0
        for text, position in iter_file_documents(path, counts):
            if len(text) > PIECE_CHARS:
                yield from _encode_batch(batch, tokenizer, dtype, eos)
                batch, batch_chars = [], 0
                yield _encode_long(text, tokenizer, dtype, eos)
                progress.update(done_bytes + position - progress.n)
                continue
            batch.append(text)
            batch_chars += len(text)
            if len(batch) == batch_documents or batch_chars >= BATCH_CHARS:
                yield from _encode_batch(batch, tokenizer, dtype, eos)
                batch, batch_chars = [], 0
                progress.update(done_bytes + position - progress.n)
        if batch:
            yield from _encode_batch(batch, tokenizer, dtype, eos)
        done_bytes += path.stat().st_size
        progress.update(done_bytes - progress.n)


def _encode_long(text: str, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, eos: np.ndarray) -> np.ndarray:
    """One long document + EOS, tokenized piece by piece (`text_pieces`)."""
    parts = [np.asarray(tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                        dtype=dtype) for piece in text_pieces(text, PIECE_CHARS)]  # fmt: skip
    return np.concatenate([*parts, eos])


def _encode_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, eos: np.ndarray
) -> Iterator[np.ndarray]:
    if not texts:
        return
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
    """Pack the domain's token stream; the first `eval_sequences` sequences go to eval, the rest to train."""
    result = _DomainResult(files=files)
    columns = {"tokens": f"ndarray:{dtype.name}"}
    packer = _SequencePacker(seq_len)
    counts: dict[str, int] = {}
    total_bytes = sum(p.stat().st_size for p in files)
    written = 0  # sequences written so far: stream tokens [0, written * seq_len) are placed
    stream_tokens = 0
    unplaced_starts: list[int] = []  # stream offsets of documents that start in the unfinished sequence
    with (
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc=name, disable=not show_progress) as progress,
        MDSWriter(out=str(domain_dir / "eval"), columns=columns, size_limit=shard_size_limit,
                  hashes=list(SHARD_HASHES)) as eval_writer,
        MDSWriter(out=str(domain_dir / "train"), columns=columns, size_limit=shard_size_limit,
                  hashes=list(SHARD_HASHES)) as train_writer,
    ):
        for tokens in _tokenized_documents(files, tokenizer, dtype, batch_documents, progress, counts):
            result.documents += 1
            unplaced_starts.append(stream_tokens)
            stream_tokens += len(tokens)
            for sequence in packer.add(tokens):
                (eval_writer if written < eval_sequences else train_writer).write({"tokens": sequence})
                written += 1
            placed = written * seq_len
            while unplaced_starts and unplaced_starts[0] < placed:
                start_sequence = unplaced_starts.pop(0) // seq_len
                (result.eval if start_sequence < eval_sequences else result.train).documents += 1
        result.dropped_tokens = packer.discard()
    result.eval.sequences = min(written, eval_sequences)
    result.train.sequences = written - result.eval.sequences
    result.replaced_surrogates = counts.get("surrogates", 0)
    if result.documents == 0:
        raise DataPrepError(f"domain {name!r}: no non-empty documents in {len(files)} file(s)")
    if result.train.sequences == 0:
        raise DataPrepError(
            f"domain {name!r}: too little data: {written} full sequence(s) of {seq_len} tokens "
            f"({stream_tokens} tokens in {result.documents} document(s)), but the eval split needs "
            f"{eval_sequences} and training at least 1 more"
        )
    result.eval.tokens = result.eval.sequences * seq_len
    result.train.tokens = result.train.sequences * seq_len
    return result


# ---- the output folder -----------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _written_entries(out_dir: Path) -> list[str]:
    """What an earlier `prepare_data` wrote into `out_dir`, from its manifest: the manifest and the splits."""
    try:
        manifest = load_manifest(out_dir)
        entries = [MANIFEST_NAME]
        for domain in manifest["domains"]:
            for split in SPLITS:
                path = str(domain[split]["path"])
                if path != f"{domain['name']}/{split}":
                    raise ValueError(f"unexpected split path {path!r}")
                entries.append(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataPrepError(
            f"--overwrite replaces only what prepare_data wrote, but {out_dir} is not a prepare_data output "
            f"(no readable {MANIFEST_NAME}: {error}); choose an empty or new --out"
        ) from None
    return entries


def _expected_output_bytes(domain_files: Mapping[str, list[Path]], dtype: np.dtype) -> int:
    """What the shards will take, about: one token per 4 bytes of text (gzip inputs count 4x their size)."""
    text_bytes = sum(p.stat().st_size * (4 if p.name.endswith(".gz") else 1)
                     for files in domain_files.values() for p in files)  # fmt: skip
    return text_bytes // 4 * np.dtype(dtype).itemsize


def _check_out_dir(out_dir: Path, overwrite: bool, domain_files: Mapping[str, list[Path]],
                   patterns: Mapping[str, list[str]]) -> list[str]:  # fmt: skip
    """Refuse an OUT_DIR that would lose data; returns the entries an overwrite replaces (empty: none).

    OUT_DIR may not contain an input file, nor lie inside an input folder (a rerun would read its own
    output). A non-empty OUT_DIR needs `overwrite`, and is then only accepted if it is an earlier output:
    exactly its manifest and split folders are replaced, anything else in it is left alone.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"output path {out_dir} exists and is not a folder")
    resolved = out_dir.resolve()
    for name, files in domain_files.items():
        for file in files:
            if _inside(file, resolved):
                raise DataPrepError(f"--out {out_dir} contains input file {file} of domain {name!r}; write the "
                                    "output to a folder that holds no inputs")  # fmt: skip
        for pattern in patterns[name]:
            if Path(pattern).is_dir() and _inside(resolved, Path(pattern).resolve()):
                raise DataPrepError(f"--out {out_dir} lies inside input folder {pattern} of domain {name!r}; "
                                    "write the output elsewhere")  # fmt: skip
    if not out_dir.is_dir() or not any(not is_scratch_name(p.name) for p in out_dir.iterdir()):
        return []
    if not overwrite:
        raise DataPrepError(f"output folder {out_dir} is not empty; pass --overwrite to replace it")
    entries = _written_entries(out_dir)
    previous = {entry.split("/")[0] for entry in entries}
    for name in domain_files:
        if (out_dir / name).exists() and name not in previous:
            raise DataPrepError(f"{out_dir / name} exists but was not written by prepare_data (not in "
                                f"{out_dir / MANIFEST_NAME}); move it away or choose another --out")  # fmt: skip
    return entries


def _replace_outputs(staging: Path, out_dir: Path, old_entries: list[str]) -> None:
    """Move the finished output into place, replacing only `old_entries` (an earlier output's) in OUT_DIR.

    Into an absent or empty OUT_DIR the staging folder is renamed in one step. Otherwise the old manifest
    goes first and the new one comes last, so a reader never finds a manifest describing other files.
    """
    if not old_entries:
        replace_directory(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=scratch_parent(out_dir)))
    try:
        for entry in old_entries:  # the manifest first
            if (out_dir / entry).exists():
                (retired / entry).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out_dir / entry, retired / entry)
        for entry in {entry.split("/")[0] for entry in old_entries if "/" in entry}:
            if (out_dir / entry).is_dir() and not any((out_dir / entry).iterdir()):
                (out_dir / entry).rmdir()
        for domain in sorted(p.name for p in staging.iterdir() if p.is_dir()):
            (out_dir / domain).mkdir(exist_ok=True)
            for split in SPLITS:
                os.replace(staging / domain / split, out_dir / domain / split)
        os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    finally:
        shutil.rmtree(retired, ignore_errors=True)


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
    relocate: tuple[str | Path, str | Path] | None = None,
) -> dict[str, Any]:
    """Build the per-domain MDS dataset described in the module docstring and return its manifest.

    `domains` maps a name to a path, folder or glob (or a list of them); order is kept as domain order.
    With `overwrite`, a non-empty `out_dir` must be an earlier output, and only its files are replaced.
    The manifest records real, absolute paths of the tokenizer and the sources; `relocate = (staging, final)`
    records paths under `staging` as under `final`, for a caller that builds them in a staging folder
    renamed afterwards (the tiny assets).
    """

    def recorded(path: Path) -> str:
        if relocate is not None:
            staging, final = (Path(p).absolute() for p in relocate)
            if path.is_relative_to(staging):
                return str(final / path.relative_to(staging))
        return str(path)

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
    patterns = {name: [str(p) for p in specs] for name, specs in sources.items()}
    skipped: dict[str, list[tuple[str, str]]] = {name: [] for name in sources}
    domain_files = {name: resolve_domain_files(name, patterns[name], skipped[name]) for name in sources}
    _check_out_dir(out_path, overwrite, domain_files, patterns)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype_for_vocab(len(tokenizer))

    def install(staging: Path, out: Path) -> None:
        # Checked again: the folder may have been filled while we worked.
        _replace_outputs(staging, out, _check_out_dir(out, overwrite, domain_files, patterns))

    with staged_directory(out_path, install, need_bytes=_expected_output_bytes(domain_files, dtype)) as staging:
        manifest_domains = []
        for name, files in domain_files.items():
            result = _write_domain(
                name, files, tokenizer, dtype, seq_len, eval_sequences, staging / name,
                batch_documents, shard_size_limit, show_progress,
            )
            manifest_domains.append({
                "name": name,
                "sources": [recorded(Path(p).absolute()) for p in sources[name]],
                "files": len(files),
                "documents": result.documents,
                "train": {"path": f"{name}/train", **vars(result.train)},
                "eval": {"path": f"{name}/eval", **vars(result.eval)},
                "dropped_tokens": result.dropped_tokens,
                "replaced_surrogates": result.replaced_surrogates,
                "skipped_inputs": [{"path": path, "why": why} for path, why in skipped[name]],
            })
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "seq_len": seq_len,
            "eval_sequences": eval_sequences,
            "tokenizer": recorded(Path(tokenizer_dir).resolve()),
            FINGERPRINT_KEY: tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "token_dtype": dtype.name,
            "domains": manifest_domains,
        }
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


def summary_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Per domain: tokens in train / eval / dropped (and replaced lone surrogates), for the end of a run."""
    lines = []
    for domain in manifest["domains"]:
        line = (f"{domain['name']}: {domain['train']['tokens']:,} train / {domain['eval']['tokens']:,} eval / "
                f"{domain['dropped_tokens']:,} dropped tokens ({domain['train']['sequences']:,} + "
                f"{domain['eval']['sequences']:,} sequences of {manifest['seq_len']} tokens, {domain['files']} "
                f"file(s), {domain['documents']:,} document(s))")  # fmt: skip
        if domain.get("replaced_surrogates"):
            line += f"; replaced {domain['replaced_surrogates']:,} lone surrogate(s) with U+FFFD"
        lines.append(line)
        for entry in domain.get("skipped_inputs", []):
            lines.append(f"{domain['name']}: skipped {entry['path']} ({entry['why']})")
    return lines


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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier prepare_data output in --out (only the files it wrote)")
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
    except ConfigError as e:
        return report_error(e, prog="prepare_data")
    for line in summary_lines(manifest):
        print(line)
    print(f"wrote {args.out}")
    return 0
