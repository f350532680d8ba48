"""Data preparation: packing, determinism, manifest, errors, atomic output."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from streaming import LocalDataset

from drpruning.data_prep import (
    DataPrepError,
    load_manifest,
    main,
    prepare_data,
    resolve_domain_files,
    token_dtype_for_vocab,
)
from drpruning.tiny import make_tiny_corpus, make_tiny_tokenizer, tiny_documents

SEQ_LEN = 32
EVAL_SEQUENCES = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prep_assets")
    make_tiny_tokenizer(root / "tokenizer")
    files = make_tiny_corpus(root / "corpus", n_domains=3, docs_per_domain=60)
    return {"tokenizer": root / "tokenizer", **files}


def _prepare(assets: dict[str, Path], out: Path, **kwargs) -> dict:
    domains = {name: str(assets[name]) for name in ("prose", "code", "math")}
    options = {"seq_len": SEQ_LEN, "eval_sequences": EVAL_SEQUENCES, "show_progress": False, **kwargs}
    return prepare_data(domains, assets["tokenizer"], out, **options)


def _rows(split_dir: Path) -> np.ndarray:
    dataset = LocalDataset(local=str(split_dir))
    return np.stack([dataset[i]["tokens"] for i in range(len(dataset))])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_inputs_give_identical_files(assets, tmp_path):
    _prepare(assets, tmp_path / "a")
    _prepare(assets, tmp_path / "b")
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert sorted(first) == sorted(second)
    assert first == second


def test_tiny_assets_are_reproducible(tmp_path):
    make_tiny_tokenizer(tmp_path / "t1")
    make_tiny_tokenizer(tmp_path / "t2")
    assert (tmp_path / "t1/tokenizer.json").read_bytes() == (tmp_path / "t2/tokenizer.json").read_bytes()
    make_tiny_corpus(tmp_path / "c1", n_domains=4)
    make_tiny_corpus(tmp_path / "c2", n_domains=4)
    assert _tree_bytes(tmp_path / "c1") == _tree_bytes(tmp_path / "c2")


def test_manifest_matches_shards(assets, tmp_path):
    manifest = _prepare(assets, tmp_path / "out")
    assert manifest == load_manifest(tmp_path / "out")
    assert [d["name"] for d in manifest["domains"]] == ["prose", "code", "math"]
    assert manifest["token_dtype"] == "uint16" and manifest["seq_len"] == SEQ_LEN
    assert manifest["vocab_size"] == 512
    for domain in manifest["domains"]:
        for split in ("train", "eval"):
            rows = _rows(tmp_path / "out" / domain[split]["path"])
            assert rows.dtype == np.uint16 and rows.shape == (domain[split]["sequences"], SEQ_LEN)
            assert domain[split]["tokens"] == rows.size
        assert domain["eval"]["sequences"] == EVAL_SEQUENCES
        assert domain["train"]["documents"] + domain["eval"]["documents"] == 60


def test_packing_joins_documents_with_eos_and_keeps_splits_document_disjoint(assets, tmp_path):
    manifest = _prepare(assets, tmp_path / "out")
    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    documents = [
        tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for doc in tiny_documents("code", 60)
    ]
    code = manifest["domains"][1]
    eval_docs = code["eval"]["documents"]
    eval_stream = np.concatenate(documents[:eval_docs])
    train_stream = np.concatenate(documents[eval_docs:])
    eval_rows, train_rows = _rows(tmp_path / "out/code/eval"), _rows(tmp_path / "out/code/train")
    np.testing.assert_array_equal(eval_rows.reshape(-1), eval_stream[: eval_rows.size])
    # the eval split ends inside document `eval_docs - 1`; training restarts at the next document
    assert len(np.concatenate(documents[: eval_docs - 1])) < eval_rows.size <= len(eval_stream)
    np.testing.assert_array_equal(train_rows.reshape(-1), train_stream[: train_rows.size])
    assert len(train_stream) - train_rows.size < SEQ_LEN  # only the unfinished tail is dropped


def test_token_dtype_switches_to_uint32_above_uint16_range():
    assert token_dtype_for_vocab(65536) == np.uint16
    assert token_dtype_for_vocab(65537) == np.uint32


def test_folders_and_globs_resolve_in_sorted_order(tmp_path):
    (tmp_path / "lib/b").mkdir(parents=True)
    for name in ["lib/z.txt", "lib/b/a.jsonl", "lib/a.jsonl.gz", "lib/skip.csv"]:
        (tmp_path / name).write_text("x")
    found = resolve_domain_files("d", [str(tmp_path / "lib")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["lib/a.jsonl.gz", "lib/b/a.jsonl", "lib/z.txt"]
    globbed = resolve_domain_files("d", [str(tmp_path / "lib/**/*.csv"), str(tmp_path / "lib/z.txt")])
    assert [p.name for p in globbed] == ["skip.csv", "z.txt"]


def test_cli_builds_from_globs_and_plain_text(assets, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i, doc in enumerate(tiny_documents("code", 40)):
        (src / "pkg" / f"mod{i:02d}.py").write_text(doc)
    out = tmp_path / "out"
    code = main([
        "--tokenizer", str(assets["tokenizer"]), "--seq-len", str(SEQ_LEN), "--eval-sequences", "2",
        "--out", str(out), "--domain", f"code={src}/**/*.py", "--domain", f"books={assets['prose']}",
        "--no-progress",
    ])
    assert code == 0
    manifest = load_manifest(out)
    assert [d["name"] for d in manifest["domains"]] == ["code", "books"]
    assert manifest["domains"][0]["files"] == 40
    assert "wrote" in capsys.readouterr().out


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_folder", "matches no input files"),
        ("blank_documents", "no non-empty documents"),
        ("bad_utf8", "bad.txt: not valid UTF-8"),
        ("no_text_field", "notext.jsonl.gz:2: line has no 'text' field"),
        ("bad_json", "broken.jsonl:1: invalid JSON"),
        ("bad_name", "'my-domain' is not a valid identifier"),
        ("missing_tokenizer", "tokenizer directory not found"),
        ("not_a_tokenizer", "cannot load a tokenizer"),
        ("too_little_data", "too little data"),
    ],
)
def test_bad_input_names_the_problem(assets, tmp_path, case, message):
    domains: dict[str, str] = {"prose": str(assets["prose"])}
    tokenizer: Path = assets["tokenizer"]
    eval_sequences = EVAL_SEQUENCES
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        domains["extra"] = str(tmp_path / "empty")
    elif case == "blank_documents":
        domains["extra"] = str(_write_gz(tmp_path / "blank.jsonl.gz", ['{"text": ""}', "", '{"text": "  "}']))
    elif case == "bad_utf8":
        (tmp_path / "bad.txt").write_bytes(b"fine text \xff\xfe more")
        domains["extra"] = str(tmp_path / "bad.txt")
    elif case == "no_text_field":
        domains["extra"] = str(_write_gz(tmp_path / "notext.jsonl.gz", ['{"text": "a"}', '{"body": "b"}']))
    elif case == "bad_json":
        (tmp_path / "broken.jsonl").write_text('{"text": \n')
        domains["extra"] = str(tmp_path / "broken.jsonl")
    elif case == "bad_name":
        domains["my-domain"] = str(assets["code"])
    elif case == "missing_tokenizer":
        tokenizer = tmp_path / "nope"
    elif case == "not_a_tokenizer":
        tokenizer = tmp_path / "empty_tok"
        tokenizer.mkdir()
    elif case == "too_little_data":
        eval_sequences = 10_000
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=message.replace("(", r"\(")):
        prepare_data(domains, tokenizer, out, SEQ_LEN, eval_sequences, show_progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cli_reports_errors_without_traceback(assets, tmp_path, capsys):
    code = main([
        "--tokenizer", str(tmp_path / "nope"), "--seq-len", "8", "--eval-sequences", "1",
        "--out", str(tmp_path / "out"), "--domain", f"prose={assets['prose']}", "--no-progress",
    ])
    assert code == 2
    assert "tokenizer directory not found" in capsys.readouterr().err


def test_non_empty_output_needs_overwrite_and_failures_keep_the_old_data(assets, tmp_path):
    out = tmp_path / "out"
    _prepare(assets, out)
    before = _tree_bytes(out)
    with pytest.raises(DataPrepError, match="not empty; pass --overwrite"):
        _prepare(assets, out)
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    with pytest.raises(DataPrepError, match="not valid UTF-8"):
        prepare_data(
            {"prose": str(assets["prose"]), "bad": str(tmp_path / "bad.txt")}, assets["tokenizer"], out,
            SEQ_LEN, EVAL_SEQUENCES, overwrite=True, show_progress=False,
        )
    assert _tree_bytes(out) == before
    manifest = _prepare(assets, out, overwrite=True, seq_len=16)
    assert load_manifest(out) == manifest and manifest["seq_len"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "out"]

