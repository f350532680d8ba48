"""The shipped demo corpus is intact, big enough per domain, well-formed, and its domains really differ."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from drpruning.demo import corpus as demo_corpus

REPO = Path(__file__).resolve().parents[2]
MIN_DOCUMENTS = 100
MIN_TEXT_BYTES = 1_000_000
MAX_TOTAL_BYTES = 6_000_000

# A regex that most documents of a domain match; for fiction/dictionary/german also rare elsewhere.
MARKERS = {
    "code": r"^\s*(def|class|import|from) \w",
    "docs": r"(>>> |^\s*Note:|New in version|Changed in version)|\w+\(.*\)",
    "fiction": r"^(CHAPTER|Chapter) [IVXLC\d]+",
    "dictionary": r"^\S[^\n]*: /[^/\n]*/",
    "german": r"\b(und|der|die|das|nicht)\b",
}
EXCLUSIVE = ("fiction", "dictionary", "german")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return demo_corpus.manifest()


@pytest.fixture(scope="module")
def documents(manifest: dict) -> dict[str, list[dict]]:
    return {d: list(demo_corpus.iter_documents(d)) for d in manifest["domains"]}


def test_files_match_manifest(manifest: dict) -> None:
    domains = manifest["domains"]
    assert len(domains) >= 5
    assert set(domains) == set(MARKERS)
    listed = {e["file"] for e in domains.values()} | {"manifest.json", "NOTICE.md", "__init__.py"}
    shipped = {p.name for p in demo_corpus.CORPUS_DIR.iterdir() if p.name != "__pycache__"}
    assert shipped == listed
    total = 0
    for name, entry in domains.items():
        data = (demo_corpus.CORPUS_DIR / entry["file"]).read_bytes()
        assert entry["file"] == f"{name}.jsonl.gz"
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} does not match its manifest sha256"
        assert 400_000 <= len(data) <= 1_600_000, f"{name}: {len(data)} bytes compressed"
        assert set(entry["packages"]) <= set(manifest["packages"])
        total += len(data)
    assert total <= MAX_TOTAL_BYTES


def test_documents_are_valid_and_counted(manifest: dict, documents: dict[str, list[dict]]) -> None:
    for name, docs in documents.items():
        entry = manifest["domains"][name]
        assert len(docs) == entry["documents"] >= MIN_DOCUMENTS, name
        assert sum(len(d["text"].encode("utf-8")) for d in docs) == entry["text_bytes"] >= MIN_TEXT_BYTES
        sources = [d["source"] for d in docs]
        assert len(set(sources)) == len(sources), f"{name}: duplicate sources"
        for d in docs:
            assert set(d) == {"text", "source"}
            assert isinstance(d["text"], str) and d["text"].strip(), d["source"]
            assert d["source"].split(":", 1)[0] in entry["packages"], d["source"]
            assert "\r" not in d["text"] and "\x00" not in d["text"], d["source"]
            assert d["text"] == d["text"].strip("\n") and not re.search(r"[ \t]+\n|\n{3}", d["text"]), d["source"]


def test_every_line_is_json_utf8(manifest: dict) -> None:
    """Readers other than ours (LLM-Foundry's text loader, jq) see one UTF-8 JSON object per line."""
    for entry in manifest["domains"].values():
        raw = gzip.decompress((demo_corpus.CORPUS_DIR / entry["file"]).read_bytes())
        lines = raw.decode("utf-8").split("\n")
        assert lines[-1] == ""
        for line in lines[:-1]:
            assert isinstance(json.loads(line), dict)


def test_domains_have_their_markers(documents: dict[str, list[dict]]) -> None:
    for marker, pattern in MARKERS.items():
        for name, docs in documents.items():
            share = sum(bool(re.search(pattern, d["text"], re.M)) for d in docs) / len(docs)
            if name == marker:
                assert share >= 0.85, f"{name}: only {share:.2f} of documents look like {marker}"
            elif marker in EXCLUSIVE:
                assert share <= 0.2, f"{name}: {share:.2f} of documents look like {marker}"


def test_character_distributions_differ(documents: dict[str, list[dict]]) -> None:
    """Pairwise Jensen-Shannon divergence of character unigrams: each domain is its own distribution."""
    dists = {}
    for name, docs in documents.items():
        counts = Counter(itertools.chain.from_iterable(d["text"] for d in docs))
        n = sum(counts.values())
        dists[name] = {c: v / n for c, v in counts.items()}

    def js(p: dict[str, float], q: dict[str, float]) -> float:
        m = {c: (p.get(c, 0.0) + q.get(c, 0.0)) / 2 for c in p.keys() | q.keys()}
        return sum(0.5 * a[c] * math.log2(a[c] / m[c]) for a in (p, q) for c in a if a[c] > 0)

    for a, b in itertools.combinations(sorted(dists), 2):
        assert js(dists[a], dists[b]) > 0.015, f"{a} and {b} have near-identical character distributions"
    umlauts = {name: sum(d.get(c, 0.0) for c in "äöüßÄÖÜ") for name, d in dists.items()}
    assert umlauts["german"] > 0.005
    assert all(v < 0.0005 for name, v in umlauts.items() if name != "german")


def test_notice_covers_every_domain_and_package(manifest: dict) -> None:
    notice = (demo_corpus.CORPUS_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for name in manifest["domains"]:
        assert f"## `{name}`" in notice
    for package, version in manifest["packages"].items():
        assert f"`{package}`" in notice and version in notice


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_demo_corpus", REPO / "scripts" / "build_demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_builder_output_is_deterministic(tmp_path: Path) -> None:
    """The rebuild promise: same documents → same bytes (gzip mtime 0, no file name), same selection."""
    build = _load_builder()
    docs = [(f"pkg:file{i}", f"text {i} " * 100) for i in range(20)]
    kept = build.select(docs, 5_000)
    assert kept == build.select(list(reversed(docs)), 5_000)
    assert sum(len(t) for _, t in kept) <= 5_000
    a = build.write_jsonl_gz(tmp_path / "a.jsonl.gz", kept)
    b = build.write_jsonl_gz(tmp_path / "b.jsonl.gz", kept)
    assert a == b and a[4:8] == b"\0\0\0\0"
    assert [json.loads(x)["source"] for x in gzip.decompress(a).decode().splitlines()] == [s for s, _ in kept]


def test_builder_strips_rest_markup() -> None:
    build = _load_builder()
    src = (
        ":mod:`json` --- JSON\n====================\n\n.. index:: single: JSON\n   pair: a; b\n\n"
        "Use :func:`~json.dumps` or ``json.loads`` (see :pep:`8` and `docs <https://x.org>`_).\n\n"
        ".. versionadded:: 3.2\n\n.. function:: dumps(obj, **kw)\n\n   Serialize *obj*::\n\n      >>> 1\n"
    )
    out = build.rst_to_text(src)
    assert out.split("\n")[0] == "json --- JSON"
    assert "Use dumps or json.loads (see PEP 8 and docs)." in out
    assert "New in version 3.2:" in out and "dumps(obj, **kw)" in out and "Serialize *obj*:" in out
    assert "index" not in out and "====" not in out and "`" not in out
