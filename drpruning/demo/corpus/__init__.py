"""The multi-domain demo corpus shipped with drpruning (sources and licences: NOTICE.md here).

One `<domain>.jsonl.gz` per domain, one `{"text", "source"}` object per line, listed with sizes and
sha256 in manifest.json; `scripts/build_demo_corpus.py` rebuilds them from Debian packages.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent


def manifest() -> dict:
    """The parsed manifest.json (domains → file, documents, bytes, text_bytes, sha256, packages)."""
    return json.loads((CORPUS_DIR / "manifest.json").read_text(encoding="utf-8"))


def domains() -> list[str]:
    """Domain names in a stable (sorted) order, usable as domain ids."""
    return sorted(manifest()["domains"])


def domain_path(domain: str) -> Path:
    """The .jsonl.gz file of one domain."""
    entry = manifest()["domains"].get(domain)
    if entry is None:
        raise KeyError(f"no demo domain {domain!r}; have {domains()}")
    return CORPUS_DIR / entry["file"]


def iter_documents(domain: str) -> Iterator[dict[str, str]]:
    """Yield the documents of one domain in file order, as {"text": ..., "source": ...}."""
    with gzip.open(domain_path(domain), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
