"""The manifest of a prepared data folder: what every reader of prepared data checks first.

`OUT_DIR/manifest.json` (written by `drpruning/data/prepare.py`) lists the domains in order, the counts
per split, `seq_len`, the tokenizer (path and fingerprint) and the token dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from streaming import LocalDataset

from drpruning.errors import ConfigError, DataDirError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "eval")


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id (halves disk and page cache for <65k vocabularies)."""
    return np.dtype(np.uint16) if vocab_size - 1 <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read `data_dir/manifest.json`, failing with a message that says how such a folder is made."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataDirError(
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
        raise ConfigError(f"unknown domain(s) {unknown} in {data_dir}; known domains: {known}")
    if not selected or len(set(selected)) != len(selected):
        raise ConfigError(f"domains must be a non-empty list without repeats, got {selected}")
    return selected


def split_folder(data_dir: str | Path, manifest: dict[str, Any], domain: str, split: str) -> Path:
    """The folder of one domain's prepared split, after checking that the manifest lists the domain and the
    split and that its MDS index is there. Every local reader of prepared data finds its split here."""
    entries = {entry["name"]: entry for entry in manifest["domains"]}
    if domain not in entries:
        raise ConfigError(f"domain {domain!r} is not in {Path(data_dir) / MANIFEST_NAME}; known: {list(entries)}")
    if split not in entries[domain]:
        raise ConfigError(f"domain {domain!r} has no {split!r} split in {data_dir}")
    folder = Path(data_dir) / entries[domain][split]["path"]
    if not (folder / "index.json").is_file():
        raise DataDirError(f"no MDS index at {folder}: the data folder is incomplete")
    return folder


def open_split(data_dir: str | Path, manifest: dict[str, Any], domain: str, split: str) -> LocalDataset:
    """One domain's prepared split (a local MDS folder), checked by `split_folder`, open for reading."""
    return LocalDataset(local=str(split_folder(data_dir, manifest, domain, split)))
