"""Data preparation: packing, determinism, manifest, errors, atomic output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from streaming import LocalDataset

from drpruning.data.manifest import load_manifest, token_dtype_for_vocab
from drpruning.data.prepare import prepare_data
from drpruning.data.prepare_cli import main
from drpruning.data.sources import resolve_domain_files
from drpruning.demo.tiny import make_tiny_corpus, make_tiny_tokenizer, tiny_documents
from drpruning.errors import DataPrepError

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
        assert domain["documents"] == 60
        assert domain["train"]["documents"] + domain["eval"]["documents"] <= 60  # a tail document may start nowhere
        assert domain["dropped_tokens"] < SEQ_LEN


def test_packing_joins_documents_with_eos_and_eval_takes_the_first_sequences(assets, tmp_path):
    manifest = _prepare(assets, tmp_path / "out")
    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    documents = [
        tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for doc in tiny_documents("code", 60)
    ]
    stream = np.concatenate(documents)
    eval_rows, train_rows = _rows(tmp_path / "out/code/eval"), _rows(tmp_path / "out/code/train")
    # eval = the first EVAL_SEQUENCES sequences of the domain's stream, train = every following full one
    np.testing.assert_array_equal(eval_rows.reshape(-1), stream[: eval_rows.size])
    np.testing.assert_array_equal(train_rows.reshape(-1), stream[eval_rows.size: eval_rows.size + train_rows.size])
    code = manifest["domains"][1]
    assert code["dropped_tokens"] == len(stream) - eval_rows.size - train_rows.size < SEQ_LEN
    # documents are counted in the split they start in
    starts = np.cumsum([0] + [len(d) for d in documents[:-1]])
    assert code["eval"]["documents"] == int((starts < eval_rows.size).sum())
    placed = eval_rows.size + train_rows.size
    assert code["train"]["documents"] == int(((starts >= eval_rows.size) & (starts < placed)).sum())


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



# ---- issue 11: nothing a user has is lost; wrong input is refused ------------------------------------------


def _long_text(documents: int, seed: int = 0) -> str:
    return "\n\n".join(tiny_documents("prose", documents, seed=seed))


def test_overwrite_replaces_only_what_prepare_data_wrote(assets, tmp_path):
    out = tmp_path / "out"
    _prepare(assets, out)
    (out / "NOTES.md").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "other_model.safetensors").write_bytes(b"weights")
    (out / "prose" / "README.txt").write_text("about prose")
    manifest = _prepare(assets, out, overwrite=True, seq_len=16)
    assert load_manifest(out) == manifest and manifest["seq_len"] == 16
    assert (out / "NOTES.md").read_text() == "my notes"
    assert (out / "sub" / "other_model.safetensors").read_bytes() == b"weights"
    assert (out / "prose" / "README.txt").read_text() == "about prose"
    assert _rows(out / "prose" / "train").shape[1] == 16
    # a domain dropped from the new output loses exactly its splits
    prepare_data({"code": str(assets["code"])}, assets["tokenizer"], out, SEQ_LEN, EVAL_SEQUENCES, overwrite=True,
                 show_progress=False)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "code", "manifest.json", "prose", "sub"]
    assert sorted(p.name for p in (out / "prose").iterdir()) == ["README.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_output(assets, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "NOTES.md").write_text("my notes")
    (out / "sub" / "other_model.safetensors").write_bytes(b"weights")
    before = _tree_bytes(out)
    with pytest.raises(DataPrepError, match="not a prepare_data output"):
        _prepare(assets, out, overwrite=True)
    assert _tree_bytes(out) == before
    # an earlier output, but a new domain's folder holds something prepare_data did not write
    _prepare(assets, tmp_path / "prev")
    (tmp_path / "prev" / "facts").mkdir()
    (tmp_path / "prev" / "facts" / "mine.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="facts exists but was not written by prepare_data"):
        prepare_data({"facts": str(assets["prose"])}, assets["tokenizer"], tmp_path / "prev", SEQ_LEN,
                     EVAL_SEQUENCES, overwrite=True, show_progress=False)  # fmt: skip
    assert (tmp_path / "prev" / "facts" / "mine.txt").read_text() == "keep me"


def test_an_output_folder_holding_inputs_is_refused(assets, tmp_path):
    out = tmp_path / "out"
    _prepare(assets, out)
    raw = out / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text(_long_text(40))
    before = _tree_bytes(out)
    with pytest.raises(DataPrepError, match="contains input file .*a.txt"):
        prepare_data({"prose": str(raw)}, assets["tokenizer"], out, SEQ_LEN, EVAL_SEQUENCES, overwrite=True,
                     show_progress=False)  # fmt: skip
    assert _tree_bytes(out) == before
    with pytest.raises(DataPrepError, match="lies inside input folder"):
        prepare_data({"prose": str(raw)}, assets["tokenizer"], raw / "mds", SEQ_LEN, EVAL_SEQUENCES,
                     show_progress=False)  # fmt: skip
    assert _tree_bytes(out) == before


def test_eval_split_takes_sequences_so_only_partial_sequences_are_dropped(assets, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(_long_text(60, seed=1))  # two long documents: the old split lost ~50 %
    (corpus / "b.txt").write_text(_long_text(60, seed=2))
    manifest = prepare_data({"two": str(corpus), "one": str(corpus / "a.txt")}, assets["tokenizer"],
                            tmp_path / "out", SEQ_LEN, EVAL_SEQUENCES, show_progress=False)  # fmt: skip
    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    lengths = [len(tokenizer((corpus / f).read_text(), add_special_tokens=False)["input_ids"]) + 1
               for f in ("a.txt", "b.txt")]  # fmt: skip
    two, one = manifest["domains"]
    assert two["documents"] == 2 and one["documents"] == 1
    assert two["eval"]["documents"] == 1 and two["train"]["documents"] == 1
    for domain, total in ((two, sum(lengths)), (one, lengths[0])):
        assert domain["eval"]["sequences"] == EVAL_SEQUENCES
        assert domain["train"]["tokens"] + domain["eval"]["tokens"] + domain["dropped_tokens"] == total
        assert domain["dropped_tokens"] == total % SEQ_LEN
    rows = np.concatenate([_rows(tmp_path / "out/one/eval"), _rows(tmp_path / "out/one/train")]).reshape(-1)
    expected = tokenizer((corpus / "a.txt").read_text(), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(rows, expected[: rows.size])


def test_cli_prints_train_eval_and_dropped_tokens_per_domain(assets, tmp_path, capsys):
    code = main([
        "--tokenizer", str(assets["tokenizer"]), "--seq-len", str(SEQ_LEN), "--eval-sequences", "2",
        "--out", str(tmp_path / "out"), "--domain", f"prose={assets['prose']}", "--domain", f"code={assets['code']}",
        "--no-progress",
    ])
    assert code == 0
    manifest = load_manifest(tmp_path / "out")
    printed = capsys.readouterr().out
    for domain in manifest["domains"]:
        assert (f"{domain['name']}: {domain['train']['tokens']:,} train / {domain['eval']['tokens']:,} eval / "
                f"{domain['dropped_tokens']:,} dropped tokens") in printed  # fmt: skip


def test_json_lines_are_read_by_content_and_binary_files_refused(assets, tmp_path):
    texts = tiny_documents("math", 80)
    lines = "".join(json.dumps({"text": t, "url": "https://x"}) + "\n" for t in texts)
    for name in ("data.json", "data.txt", "data.jsonl"):
        (tmp_path / name).write_text(lines)
    manifest = prepare_data({f"d{i}": str(tmp_path / n) for i, n in enumerate(("data.json", "data.txt", "data.jsonl"))},
                            assets["tokenizer"], tmp_path / "out", SEQ_LEN, EVAL_SEQUENCES, show_progress=False)
    streams = [np.concatenate([_rows(tmp_path / f"out/d{i}/eval"), _rows(tmp_path / f"out/d{i}/train")]).reshape(-1)
               for i in range(3)]  # fmt: skip
    np.testing.assert_array_equal(streams[0], streams[2])  # the markup is not read as text
    np.testing.assert_array_equal(streams[1], streams[2])
    assert all(d["documents"] == 80 for d in manifest["domains"])
    (tmp_path / "pretty.json").write_text(json.dumps([{"text": t} for t in texts], indent=1))
    with pytest.raises(DataPrepError, match=r"pretty.json:1: invalid JSON .*must hold JSON lines"):
        prepare_data({"d": str(tmp_path / "pretty.json")}, assets["tokenizer"], tmp_path / "o2", SEQ_LEN,
                     EVAL_SEQUENCES, show_progress=False)  # fmt: skip
    with gzip.open(tmp_path / "data.txt.gz", "wt") as f:
        f.write(_long_text(50))
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02" * 100)
    for name, kind in (("data.txt.gz", "a gzip file"), ("weights.bin", "a binary file")):
        with pytest.raises(DataPrepError, match=f"{name}: {kind}.*accepted: plain text"):
            prepare_data({"d": str(tmp_path / name)}, assets["tokenizer"], tmp_path / "o3", SEQ_LEN,
                         EVAL_SEQUENCES, show_progress=False)  # fmt: skip
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.json").write_text(lines)
    with pytest.raises(DataPrepError, match=r"holds no .txt/.jsonl/.jsonl.gz files .*part.json.*glob"):
        resolve_domain_files("d", [str(tmp_path / "folder")])


def test_lone_surrogates_are_replaced_and_counted(assets, tmp_path, capsys):
    texts = tiny_documents("prose", 60)
    raw = [json.dumps({"text": t}) for t in texts]
    raw[3] = '{"text": "broken \\ud800 half and \\udfff another"}'
    (tmp_path / "web.jsonl").write_text("\n".join(raw) + "\n")
    code = main([
        "--tokenizer", str(assets["tokenizer"]), "--seq-len", str(SEQ_LEN), "--eval-sequences", "2",
        "--out", str(tmp_path / "out"), "--domain", f"web={tmp_path / 'web.jsonl'}", "--no-progress",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert load_manifest(tmp_path / "out")["domains"][0]["replaced_surrogates"] == 2
    assert "replaced 2 lone surrogate(s) with U+FFFD" in captured.out
