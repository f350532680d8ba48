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

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from drpruning.atomic import is_scratch_name, replace_directory, scratch_parent, staged_directory
from drpruning.data.checks import FINGERPRINT_KEY, tokenizer_fingerprint
from drpruning.data.manifest import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    load_manifest,
    token_dtype_for_vocab,
)
from drpruning.data.sources import resolve_domain_files, validate_domain_name
from drpruning.data.tokenize import SequencePacker, load_tokenizer, tokenized_documents
from drpruning.errors import DataPrepError

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
    packer = SequencePacker(seq_len)
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
        for tokens in tokenized_documents(files, tokenizer, dtype, batch_documents, progress, counts):
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
