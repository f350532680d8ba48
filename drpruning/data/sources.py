"""A domain's input files: which files, in which order, and the documents they hold.

Input files are read by format: `.jsonl` / `.json` / `.ndjson` (optionally `.gz`) hold JSON lines with a
`text` field; any other file is one plain-text document, unless its first line is a JSON object with a
`text` field (then it is read as JSON lines too). Binary or compressed files of another kind are refused.
Lone UTF-16 surrogates in JSON strings (common in web scrapes) become U+FFFD and are counted.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from drpruning.errors import DataPrepError

FOLDER_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
"""What a folder given as a domain's input contributes (recursively); globs and file paths take any file."""
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ACCEPTED_FORMATS = ("plain text (one document per file, e.g. .txt, .md, .py), "
                    "JSON lines with a 'text' field (.jsonl, .json, .ndjson, each optionally .gz)")
_BINARY_SIGNATURES = {
    b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip", b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz", b"PAR1": "parquet", b"ARROW1": "arrow", b"%PDF": "pdf",
}
_SNIFF_BYTES = 1 << 13
UTF8_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors write first: not text, so every reader drops it
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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


def _walk(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """Regular files under `folder`; what is not read is recorded in `skipped` as (path, why), never dropped
    silently: dangling links, unreadable files, other file types, and symlinked folders (not followed, so a
    link cannot loop or pull in a tree outside the input)."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in sorted(dirs):
            if (Path(root) / name).is_symlink():
                skipped.append((str(Path(root) / name), "symlinked folder, not followed"))
        for name in sorted(names):
            path = Path(root) / name
            if not path.exists():
                skipped.append((str(path), "dangling symlink"))
            elif not path.is_file():
                skipped.append((str(path), "not a regular file"))
            elif not os.access(path, os.R_OK):
                skipped.append((str(path), "not readable"))
            else:
                found.append(path)
    return found


def resolve_domain_files(name: str, patterns: Sequence[str],
                         skipped: list[tuple[str, str]] | None = None) -> list[Path]:  # fmt: skip
    """Files of one domain in sorted order: folders give their .txt/.jsonl/.jsonl.gz files recursively,
    globs (with `**`) give every file they match, plain paths give themselves. Entries a folder or glob
    holds but that cannot be read (see `_walk`) are appended to `skipped` as (path, why)."""
    skipped = [] if skipped is None else skipped
    files: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = _walk(path, skipped)
            matched = [p for p in found if p.name.endswith(FOLDER_SUFFIXES)]
            if found and not matched:
                raise DataPrepError(
                    f"domain {name!r}: folder {pattern!r} holds no {'/'.join(FOLDER_SUFFIXES)} files ({len(found)} "
                    f"other file(s), e.g. {found[0].name}); name other files with a glob, e.g. '{path}/**/*.json'"
                )
        elif path.is_file():
            matched = [path]
        else:
            globbed = [Path(p) for p in glob.glob(pattern, recursive=True)]
            matched = [p for p in globbed if p.is_file()]
            skipped.extend((str(p), "dangling symlink") for p in globbed if p.is_symlink() and not p.exists())
        if not matched:
            raise DataPrepError(f"domain {name!r}: {pattern!r} matches no input files")
        files.update(p.resolve() for p in matched)
    return sorted(files, key=lambda p: p.as_posix())


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{where}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r})") from e


def _first_line_is_json_lines(head: bytes) -> bool:
    """True when the first non-blank line of `head` is a whole JSON object with a `text` field."""
    for line in head.removeprefix(UTF8_BOM).splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return False
            return isinstance(record, dict) and "text" in record
    return False


def file_format(path: Path) -> str:
    """`jsonl`, `jsonl.gz` or `text`, from the name and, for other names, the first bytes of the file.

    Refuses binary and compressed files that are not JSON lines, naming the accepted formats, instead of
    reading their bytes (or their markup) as text.
    """
    name = path.name.lower()
    if name.endswith(tuple(suffix + ".gz" for suffix in JSONL_SUFFIXES)):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    kind = next((kind for signature, kind in _BINARY_SIGNATURES.items() if head.startswith(signature)), None)
    if kind is None and b"\x00" in head:
        kind = "binary"
    if kind is not None:
        raise DataPrepError(f"{path}: a {kind} file, which prepare_data cannot read; accepted: {ACCEPTED_FORMATS}")
    return "jsonl" if _first_line_is_json_lines(head) else "text"


def _iter_jsonl_texts(stream: BinaryIO, path: Path, counts: dict[str, int]) -> Iterator[str]:
    for line_number, raw_line in enumerate(stream, start=1):
        where = f"{path}:{line_number}"
        line = _decode_utf8(raw_line.removeprefix(UTF8_BOM) if line_number == 1 else raw_line, where).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (" (a .json input must hold JSON lines: one {\"text\": ...} object per line)"
                    if path.name.lower().removesuffix(".gz").endswith(".json") else "")  # fmt: skip
            raise DataPrepError(f"{where}: invalid JSON ({e.msg}){hint}") from e
        if not isinstance(record, dict) or "text" not in record:
            raise DataPrepError(f"{where}: line has no 'text' field")
        text = record["text"]
        if not isinstance(text, str):
            raise DataPrepError(f"{where}: 'text' is {type(text).__name__}, expected a string")
        if _LONE_SURROGATE.search(text):
            # A lone surrogate (an unpaired \\ud800 escape) is not a character: no tokenizer can encode it.
            text, replaced = _LONE_SURROGATE.subn("\ufffd", text)
            counts["surrogates"] = counts.get("surrogates", 0) + replaced
        yield text


def iter_file_documents(path: Path, counts: dict[str, int] | None = None) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the file read so far); empty documents are skipped.

    `counts["surrogates"]` accumulates the lone surrogates replaced by U+FFFD.
    """
    counts = {} if counts is None else counts
    kind = file_format(path)
    with open(path, "rb") as raw:
        if kind == "jsonl.gz":
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    for text in _iter_jsonl_texts(gz, path, counts):
                        if text.strip():
                            yield text, raw.tell()
            except (OSError, EOFError) as e:
                raise DataPrepError(f"{path}: cannot decompress ({e})") from e
        elif kind == "jsonl":
            for text in _iter_jsonl_texts(raw, path, counts):
                if text.strip():
                    yield text, raw.tell()
        else:
            text = _decode_utf8(raw.read().removeprefix(UTF8_BOM), str(path))
            if text.strip():
                yield text, raw.tell()
