#!/usr/bin/env python3
"""Rebuild the shipped multi-domain demo corpus (drpruning/demo/corpus/) from Debian packages.

Provenance, not a build step: the demo and the tests read the committed copy. Running this with the
same Debian package versions gives byte-identical files (gzip mtime 0, stable ordering), so anyone
can check that the shipped corpus is exactly what these sources and this cleaning produce.

    python scripts/build_demo_corpus.py [--out drpruning/demo_corpus] [--cache runs/cache/demo-corpus-debs]

Needs `apt-get` and `dpkg-deb` (Debian/Ubuntu) and network access to the Debian archive; the .deb files
are fetched with `apt-get download` (no root, nothing installed) and extracted with `dpkg-deb -x`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_DOC_CHARS = 400  # smaller documents (stubs, "see X" entries, front matter) carry no useful signal


@dataclass(frozen=True)
class Source:
    """One Debian package a domain is cut from, with what NOTICE.md says about it."""

    package: str
    upstream: str
    licence: str
    copyright_quotes: tuple[str, ...]  # verbatim excerpts of its copyright file (checked at build time)
    copyright_package: str = ""  # set when the package's doc dir is a symlink into this other package

    @property
    def copyright_path(self) -> str:
        pkg = self.copyright_package or self.package
        return f"usr/share/doc/{pkg}/copyright"


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    changes: str  # what the cleaning did, as the PSF and GPL licences ask of modified copies
    sources: tuple[Source, ...]
    cap_bytes: int  # UTF-8 bytes of text kept, chosen for ~1 MB gzipped per domain
    extract: Callable[[dict[str, Path]], Iterable[tuple[str, str]]]


# --------------------------------------------------------------------------------------------------
# Cleaning shared by all domains


def normalise(text: str) -> str:
    """NFC, LF line ends, no trailing blanks, at most one empty line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def unwrap_paragraphs(text: str) -> str:
    """Join hard-wrapped lines of prose into one line per paragraph (Gutenberg texts wrap at ~70)."""
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(" ".join(line.strip() for line in p.split("\n") if line.strip()) for p in paras)


def chunk(units: list[str], max_chars: int, sep: str = "\n\n") -> list[str]:
    """Greedily pack consecutive units (entries, fortunes) into documents of at most max_chars."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for u in units:
        if cur and size + len(sep) + len(u) > max_chars:
            docs.append(sep.join(cur))
            cur, size = [], 0
        cur.append(u)
        size += len(u) + len(sep)
    if cur:
        docs.append(sep.join(cur))
    return docs


# --------------------------------------------------------------------------------------------------
# code: Python standard library sources


def extract_code(roots: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """Each .py file of libpython3.11-stdlib, verbatim apart from whitespace normalisation."""
    root = roots["libpython3.11-stdlib"]
    for path in sorted(root.glob("usr/lib/python3.11/**/*.py")):
        if path.name.startswith("_sysconfigdata"):  # generated build configuration, not code
            continue
        rel = path.relative_to(root).as_posix()
        yield f"libpython3.11-stdlib:{rel}", path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# docs: Python reStructuredText documentation sources

_DROP_DIRECTIVES = {
    "index", "highlight", "toctree", "sectionauthor", "moduleauthor", "module", "currentmodule",
    "testsetup", "testcleanup", "only", "raw", "include", "literalinclude", "tabularcolumns",
    "productionlist", "image", "figure", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "impl-detail", "availability", "audit-event", "audit-event-table", "opcode", "2to3fixer", "pdbcommand",
}  # fmt: skip
_ADMONITIONS = {
    "note": "Note", "warning": "Warning", "seealso": "See also", "important": "Important",
    "caution": "Caution", "tip": "Tip", "attention": "Attention", "danger": "Danger", "hint": "Hint",
    "versionadded": "New in version", "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
}  # fmt: skip
_CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"}
_OPTION = re.compile(  # directive options, indented under their directive
    r"^\s+:(synopsis|platform|noindex|no-index|module|deprecated|type|value|async|abstractmethod|classmethod|"
    r"staticmethod|final|linenos|emphasize-lines|caption|options|skipif|hide|pyversion|encoding|language|"
    r"param|noindexentry):"
)
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_ROLE = re.compile(r":([\w.:+-]+):`([^`]+)`(?:\\ ?)?")  # a trailing "\ " or "\" glues on: `x`\s
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``(?:\\ ?)?", re.S)
_STRONG = re.compile(r"(?<![\w*])\*\*(\w(?:[^*\n]*?[\w.)!?:])?)\*\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r"\s?\[#[\w-]*\]_")


def _role_text(m: re.Match[str]) -> str:
    """`:func:`~os.path.join`` reads as `join`, `:ref:`text <target>`` as `text` (what Sphinx prints)."""
    role, body = m.groups()
    if role in ("pep", "rfc"):
        return f"{role.upper()} {body.split('#')[0]}"
    explicit = re.match(r"^(.*?)\s*<[^<>]*>$", body, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    body = body.lstrip("!")
    return body.lstrip("~").rsplit(".", 1)[-1] if body.startswith("~") else body


def rst_to_text(src: str) -> str:
    """Strip Sphinx/reST markup to readable text while keeping code blocks and structure."""
    out: list[str] = []
    skip_indent: int | None = None  # inside the body of a dropped directive or comment
    for line in src.split("\n"):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if _UNDERLINE.match(line):
            continue
        m = _DIRECTIVE.match(line)
        if m:
            lead, name, arg = m.groups()
            if name in _DROP_DIRECTIVES:
                skip_indent = len(lead)
            elif name in _ADMONITIONS:
                out.append(f"{lead}{_ADMONITIONS[name]}{' ' + arg if arg else ''}:")
            elif arg and name not in _CODE_DIRECTIVES:  # keep signatures of function/class/...; drop languages
                out.append(lead + arg)
            continue
        stripped = line.strip()
        if stripped.startswith(".. "):  # comment, link target (.. _x:) or footnote body
            skip_indent = indent
            continue
        if _OPTION.match(line):
            continue
        if stripped == "::":
            continue
        line = re.sub(r"(\S)::$", r"\1:", line)
        out.append(re.sub(r"\s+::$", "", line))
    text = "\n".join(out)  # inline markup is replaced on the whole text since roles wrap across lines
    for pattern, repl in ((_ROLE, _role_text), (_LINK, r"\1"), (_LITERAL, r"\1"), (_REF, r"\1"),
                          (_STRONG, r"\1"), (_FOOTNOTE_REF, "")):  # fmt: skip
        text = pattern.sub(repl, text)
    return text


def extract_docs(roots: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """Each documentation page of python3.11-doc (its _sources reST), markup stripped."""
    root = roots["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("includes/", "whatsnew/changelog")) or rel in {"contents.rst.txt", "license.rst.txt"}:
            continue  # fragments, an include stub, and licence text already quoted in NOTICE.md
        yield f"python3.11-doc:{rel.removesuffix('.txt')}", rst_to_text(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# fiction: Jane Austen's six novels, stored by janeaustenr as an R lazy-load database


class _RReader:
    """Minimal reader of R's XDR serialization: enough for character vectors, lists and attributes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self) -> object:
        if self.data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.pos = 2
        version = self._int()
        self._int(), self._int()  # writer and minimal reader R versions
        if version == 3:
            n = self._int()
            self.pos += n  # native encoding name
        return self._item()

    def _item(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 251, 253):  # NULL, empty env, missing arg, global env
            return None
        if kind == 255:  # back-reference to a symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol: a CHARSXP
            sym = self._item()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("utf-8" if flags & (1 << 15) or not flags & (1 << 14) else "latin-1")
        if kind == 2:  # pairlist: (tag, value) pairs
            items = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                items.append((tag, self._item()))
                flags = self._int()
                if flags & 0xFF == 254:
                    return dict(items)
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind in (16, 19, 20):  # character vector, list, expression
            value: object = [self._item() for _ in range(self._int())]
        elif kind in (10, 13):  # logical, integer
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        attrs = self._item() if has_attr else None
        if isinstance(attrs, dict) and "names" in attrs:
            return dict(zip(attrs["names"], value, strict=True))
        return value


def read_r_lazyload(prefix: Path) -> dict[str, object]:
    """Objects of an R lazy-load database (<prefix>.rdx index + <prefix>.rdb zlib blobs)."""
    index = _RReader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).read()
    assert isinstance(index, dict) and index["compressed"] == [1], "only zlib-compressed databases"
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset : offset + length]
        out[name] = _RReader(zlib.decompress(blob[4:])).read()
    return out


_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [IVXLC\d]+\.?$")


def extract_fiction(roots: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """Each chapter of each novel; front matter and 'VOLUME' lines dropped, paragraphs unwrapped."""
    books = read_r_lazyload(roots["r-cran-janeaustenr"] / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for book in sorted(books):
        lines = [line or "" for line in books[book]]  # type: ignore[union-attr]
        starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line.strip())]
        for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)], strict=True), start=1):
            body = [ln for ln in lines[a + 1 : b] if not re.match(r"^\s*VOLUME [IVX]+\s*$", ln)]
            text = unwrap_paragraphs("\n".join(body))
            text = re.sub(r"_([^_\n]+)_", r"\1", text)  # Gutenberg _italics_
            yield f"r-cran-janeaustenr:{book}#{n:03d}", lines[a].strip() + "\n\n" + text


# --------------------------------------------------------------------------------------------------
# dictionary: the Jargon File lexicon and appendices

_ENTRY = re.compile(r"^   :(.+?):(.*)$")


def extract_dictionary(roots: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """Lexicon entries grouped by initial letter into ~12 kB documents, plus the three appendices."""
    raw = gzip.decompress((roots["jargon-text"] / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    lines = raw.decode("utf-8").replace("\u00a0", " ").split("\n")  # headings use no-break spaces
    entries: list[tuple[str, list[str]]] = []
    i = 0
    appendix_at = next(k for k, ln in enumerate(lines) if ln.strip() == "Part III. Appendices")
    while i < appendix_at:
        m = _ENTRY.match(lines[i])
        if m:
            head = m.group(1)
            body = [f"{head}:{m.group(2)}"]
            i += 1
            # an entry ends at the next entry, a letter's headword index ("  C") or the appendices
            while i < appendix_at and not _ENTRY.match(lines[i]) and not re.match(r"^  \S", lines[i]):
                body.append(lines[i].removeprefix("   "))
                i += 1
            entries.append((head, body))
        else:
            i += 1
    by_letter: dict[str, list[str]] = {}
    for head, body in entries:
        letter = head[0].upper() if head[0].isalpha() else "0"
        text = re.sub(r"\{([^{}]+)\}", r"\1", normalise("\n".join(body)))  # {cross references}
        by_letter.setdefault(letter, []).append(text)
    for letter in sorted(by_letter):
        for n, doc in enumerate(chunk(by_letter[letter], 12_000), start=1):
            yield f"jargon-text:jargon.txt#{letter}-{n:02d}", doc
    starts = [k for k, ln in enumerate(lines) if re.match(r"^(Appendix [A-C]\.|Bibliography$)", ln)]
    for a, b in zip(starts, starts[1:], strict=False):
        title = lines[a].split(".")[0].replace(" ", "-")
        body = "\n".join(ln.removeprefix("   ") for ln in lines[a:b])
        yield f"jargon-text:jargon.txt#{title}", re.sub(r"\{([^{}]+)\}", r"\1", body)


# --------------------------------------------------------------------------------------------------
# german: German fortune cookie collections


def extract_german(roots: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """Each fortune file of fortunes-de (large ones cut into ~12 kB parts at fortune boundaries)."""
    root = roots["fortunes-de"] / "usr/share/games/fortunes/de"
    for path in sorted(root.iterdir()):
        if path.is_symlink() or path.suffix == ".dat" or path.name == "asciiart":
            continue  # .u8 aliases, strfile indexes, and ASCII pictures rather than text
        fortunes = [normalise(f) for f in re.split(r"^%$", path.read_text(encoding="utf-8"), flags=re.M)]
        docs = chunk([f for f in fortunes if f], 12_000)
        for n, doc in enumerate(docs, start=1):
            yield f"fortunes-de:{path.name}" + (f"#{n:03d}" if len(docs) > 1 else ""), doc


# --------------------------------------------------------------------------------------------------
# Sources and licences (the quotes are checked verbatim against each package's copyright file)

PSF_QUOTE = """\
PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2
--------------------------------------------

1. This LICENSE AGREEMENT is between the Python Software Foundation
("PSF"), and the Individual or Organization ("Licensee") accessing and
otherwise using this software ("Python") in source or binary form and
its associated documentation.

2. Subject to the terms and conditions of this License Agreement, PSF
hereby grants Licensee a nonexclusive, royalty-free, world-wide
license to reproduce, analyze, test, perform and/or display publicly,
prepare derivative works, distribute, and otherwise use Python alone
or in any derivative version, provided, however, that PSF's License
Agreement and PSF's notice of copyright, i.e., "Copyright (c) 2001,
2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010, 2011, 2012,
2013, 2014 Python Software Foundation; All Rights Reserved" are
retained in Python alone or in any derivative version prepared by
Licensee.

3. In the event Licensee prepares a derivative work that is based on
or incorporates Python or any part thereof, and wants to make
the derivative work available to others as provided herein, then
Licensee hereby agrees to include in any such work a brief summary of
the changes made to Python."""

DOMAINS: tuple[Domain, ...] = (
    Domain(
        "code",
        "Python 3.11 standard library modules (one document per .py file)",
        "code unchanged apart from trailing whitespace and runs of blank lines; generated "
        "_sysconfigdata files and files under 400 characters left out; a subset of files kept",
        (Source("libpython3.11-stdlib", "CPython 3.11, https://www.python.org/",
                "Python Software Foundation License (PSF-2.0); a few modules carry additional "
                "permissive notices (kept verbatim in the file text)",
                (PSF_QUOTE,), copyright_package="libpython3.11-minimal"),),
        4_000_000,
        extract_code,
    ),
    Domain(
        "docs",
        "Python 3.11 documentation, reStructuredText sources with Sphinx markup stripped (one document per page)",
        "roles, links, literals, heading underlines and directive markers turned into plain text; index, "
        "toctree, comment and similar blocks removed; changelog and licence pages left out; a subset of pages kept",
        (Source("python3.11-doc", "CPython 3.11 documentation, https://docs.python.org/3.11/",
                "Python Software Foundation License (PSF-2.0)", (PSF_QUOTE,)),),
        3_300_000,
        extract_docs,
    ),
    Domain(
        "fiction",
        "Jane Austen's six completed novels (one document per chapter)",
        "title pages and VOLUME lines removed, hard-wrapped lines joined into paragraphs, _italic_ "
        "underscores removed; a subset of chapters kept",
        (Source("r-cran-janeaustenr", "janeaustenr (Julia Silge), https://cran.r-project.org/package=janeaustenr; "
                "texts from Project Gutenberg",
                "public-domain novels; the janeaustenr packaging is MIT",
                ("Files: *\nCopyright: 2016-2017 Julia Silge\nLicense: MIT",
                 "License: MIT\n"
                 " Permission is hereby granted, free of charge, to any person obtaining\n"
                 " a copy of this software and associated documentation files (the\n"
                 " \"Software\"), to deal in the Software without restriction, including\n"
                 " without limitation the rights to use, copy, modify, merge, publish,\n"
                 " distribute, sublicense, and/or sell copies of the Software, and to\n"
                 " permit persons to whom the Software is furnished to do so, subject to\n"
                 " the following conditions:")),),
        2_700_000,
        extract_fiction,
    ),
    Domain(
        "dictionary",
        "The Jargon File 4.4.7 lexicon (entries grouped by initial letter) and its appendices",
        "entries cut from the plain-text rendering, headword index lists and introduction left out, "
        "indentation and {cross-reference} braces removed, entries packed into ~12 kB documents",
        (Source("jargon-text", "The Jargon File (Eric S. Raymond), http://www.catb.org/~esr/jargon/",
                "public domain",
                ("   This document (the Jargon File) is in the public domain, to be freely\n"
                "   used, shared, and modified. There are (by intention) no legal restraints\n"
                "   on what you can do with it, but there are traditions about its proper use\n"
                "   to which many hackers are quite strongly attached. Please extend the\n"
                "   courtesy of proper citation when you quote the File, ideally with a\n"
                "   version number, as it will change and grow over time.",)),),
        2_700_000,
        extract_dictionary,
    ),
    Domain(
        "german",
        "German sayings, quotations, jokes and recipes from fortunes-de (one document per file or ~12 kB part)",
        "'%' separators replaced by blank lines, trailing whitespace removed, the asciiart file left out, "
        "large files cut at fortune boundaries; a subset of parts kept",
        (Source("fortunes-de", "fortunes-de (Andreas Tille), Debian-native",
                "GPL-2+ (these files are redistributed under GPL-2+, not under drpruning's Apache-2.0)",
                ("Files: *\nCopyright: 1999-2012 Andreas Tille <tille@debian.org>\nLicense: GPL-2+",
                 "License: GPL-2+\n"
                 "    This program is free software; you can redistribute it and/or modify\n"
                 "    it under the terms of the GNU General Public License as published by\n"
                 "    the Free Software Foundation; either version 2 of the License, or\n"
                 "    (at your option) any later version.")),),
        2_700_000,
        extract_german,
    ),
)


# --------------------------------------------------------------------------------------------------
# Fetching, selection, writing


def run(cmd: list[str], cwd: Path | None = None) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch(package: str, cache: Path) -> tuple[Path, str]:
    """Download (once) and extract a package; returns (extracted root, version)."""
    cache.mkdir(parents=True, exist_ok=True)
    candidate = re.search(r"Candidate:\s*(\S+)", run(["apt-cache", "policy", package]))
    if not candidate or candidate.group(1) == "(none)":
        sys.exit(f"error: apt-cache knows no {package}; run `apt-get update` first")
    version = candidate.group(1)
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"  # apt's file name for an epoch
    if not any(cache.glob(pattern)):
        run(["apt-get", "download", f"{package}={version}"], cwd=cache)
    deb = sorted(cache.glob(pattern))[0]
    root = cache / "extracted" / deb.stem
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted extraction
        tmp.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
        tmp.rename(root)
    return root, version


def select(docs: list[tuple[str, str]], cap_bytes: int) -> list[tuple[str, str]]:
    """Keep documents in sha256(source) order while they fit the cap; that order is also the file order.

    Hash order spreads the kept text over the whole package (not just the alphabetically first
    modules or chapters) and puts no structure into the file, so a train/eval split by position is fair.
    """
    kept, total = [], 0
    for source, text in sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
        size = len(text.encode("utf-8"))
        if total + size <= cap_bytes:
            kept.append((source, text))
            total += size
    return kept


def write_jsonl_gz(path: Path, docs: list[tuple[str, str]]) -> bytes:
    """gzip with mtime 0 and no file name so the bytes depend only on the documents."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for source, text in docs:
            gz.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def notice(versions: dict[str, str], manifest: dict) -> str:
    """NOTICE.md: per domain, where the text comes from and under which licence it is redistributed."""
    parts = [
        "# Demo corpus: sources and licences\n",
        "Each `<domain>.jsonl.gz` holds one JSON object per line, `{\"text\": ..., \"source\": ...}`, where `source`",
        "is `<debian package>:<path in the package>[#part]`. The files are cut from the Debian 12 (bookworm)",
        "packages below by `scripts/build_demo_corpus.py`, which rebuilds them byte for byte from the same",
        "package versions. The text is cleaned (markup stripped, whitespace normalised), documents under",
        f"{MIN_DOC_CHARS} characters are dropped, and each domain is capped by size, keeping documents in",
        "sha256(source) order. Each domain's text stays under its own licence, quoted below from",
        "`/usr/share/doc/<package>/copyright`; none of them is covered by drpruning's Apache-2.0 licence.\n",
    ]
    for d in DOMAINS:
        m = manifest["domains"][d.name]
        parts.append(f"## `{d.name}` ({m['documents']} documents, {m['text_bytes']:,} bytes of text)\n")
        parts.append(f"{d.description}.\n")
        parts.append(f"Changes from the packaged text: {d.changes}.\n")
        for s in d.sources:
            parts += [
                f"- Debian package: `{s.package}` version `{versions[s.package]}`",
                f"- Upstream: {s.upstream}",
                f"- Licence: {s.licence}",
                f"- From `/{s.copyright_path}`"
                + (f" (in `{s.copyright_package}` version `{versions[s.copyright_package]}`; "
                   f"`{s.package}`'s doc directory links there)" if s.copyright_package else "")
                + ":\n",
                *(f"```\n{q}\n```\n" for q in s.copyright_quotes),
            ]
    return "\n".join(parts)


def check_quote(source: Source, roots: dict[str, Path]) -> None:
    """Fail if NOTICE.md would quote text that the package's copyright file does not contain."""
    path = roots[source.copyright_package or source.package] / source.copyright_path
    text = path.read_text(encoding="utf-8")
    for quote in source.copyright_quotes:
        if quote not in text:
            sys.exit(f"error: a NOTICE quote for {source.package} is not in {path}:\n{quote}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "drpruning" / "demo_corpus")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "cache" / "demo-corpus-debs")
    args = ap.parse_args()

    packages = sorted({p for d in DOMAINS for s in d.sources for p in (s.package, s.copyright_package) if p})
    roots: dict[str, Path] = {}
    versions: dict[str, str] = {}
    for pkg in packages:
        roots[pkg], versions[pkg] = fetch(pkg, args.cache.resolve())
        print(f"package {pkg} {versions[pkg]}", flush=True)
    shipped = args.out / "manifest.json"
    if shipped.is_file():
        old = json.loads(shipped.read_text(encoding="utf-8")).get("packages", {})
        for pkg, ver in sorted(old.items()):
            if versions.get(pkg) != ver:
                print(f"warning: {pkg} is {versions.get(pkg)} here, the shipped corpus used {ver}: "
                      "the output will differ", flush=True)  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": 1, "packages": {}, "domains": {}}
    for d in DOMAINS:
        for s in d.sources:
            check_quote(s, roots)
            for pkg in filter(None, (s.package, s.copyright_package)):
                manifest["packages"][pkg] = versions[pkg]
        docs = [(src, normalise(text)) for src, text in d.extract(roots)]
        docs = [(src, text) for src, text in docs if len(text) >= MIN_DOC_CHARS]
        kept = select(docs, d.cap_bytes)
        data = write_jsonl_gz(args.out / f"{d.name}.jsonl.gz", kept)
        text_bytes = sum(len(t.encode("utf-8")) for _, t in kept)
        manifest["domains"][d.name] = {
            "file": f"{d.name}.jsonl.gz",
            "documents": len(kept),
            "text_bytes": text_bytes,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "packages": [s.package for s in d.sources],
        }
        print(f"{d.name:>10}: kept {len(kept)}/{len(docs)} documents, {text_bytes:,} bytes of text, "
              f"{len(data):,} bytes gzipped", flush=True)  # fmt: skip
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (args.out / "NOTICE.md").write_text(notice(versions, manifest), encoding="utf-8")
    print(f"wrote {args.out}/ ({sum(m['bytes'] for m in manifest['domains'].values()):,} bytes of data)")


if __name__ == "__main__":
    main()
