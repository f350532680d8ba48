"""Outputs through symlinks and onto mount points, checked before the work; inputs never dropped silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streaming import LocalDataset

from drpruning.atomic import remove_stale_staging, staged_directory
from drpruning.data.prepare import prepare_data
from drpruning.data.prepare_cli import main as prepare_main
from drpruning.demo.tiny import make_tiny_assets, make_tiny_tokenizer
from drpruning.errors import OutputError

DOCS = ["The first document is about rivers and their deltas. " * 8, "Second: mountains, snow and glaciers. " * 8]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    make_tiny_tokenizer(folder)
    return folder


def _corpus(folder: Path, bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def _prepare(tokenizer: Path, source: Path, out: Path, **kwargs) -> dict:
    return prepare_data({"d": str(source)}, tokenizer, out, seq_len=16, eval_sequences=1, show_progress=False,
                        **kwargs)  # fmt: skip


def _tokens(out: Path) -> np.ndarray:
    rows = []
    for split in ("train", "eval"):
        dataset = LocalDataset(local=str(out / "d" / split))
        rows += [dataset[i]["tokens"] for i in range(len(dataset))]
    return np.concatenate(rows)


def test_a_bom_changes_no_token(tokenizer, tmp_path):
    plain = _prepare(tokenizer, _corpus(tmp_path / "plain"), tmp_path / "out-plain")
    with_bom = _prepare(tokenizer, _corpus(tmp_path / "bom", bom=True), tmp_path / "out-bom")
    np.testing.assert_array_equal(_tokens(tmp_path / "out-plain"), _tokens(tmp_path / "out-bom"))
    assert plain["domains"][0]["train"]["tokens"] == with_bom["domains"][0]["train"]["tokens"]
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": t}) for t in DOCS).encode())
    _prepare(tokenizer, jsonl, tmp_path / "out-jsonl")  # a BOM before the first JSON line is read, not refused
    np.testing.assert_array_equal(_tokens(tmp_path / "out-plain"), _tokens(tmp_path / "out-jsonl"))


def test_skipped_inputs_are_named_not_dropped(tokenizer, tmp_path, capsys):
    source = _corpus(tmp_path / "src")
    (source / "gone.txt").symlink_to(tmp_path / "missing.txt")
    elsewhere = _corpus(tmp_path / "elsewhere")
    (source / "linked").symlink_to(elsewhere, target_is_directory=True)
    code = prepare_main(["--tokenizer", str(tokenizer), "--seq-len", "16", "--eval-sequences", "1", "--out",
                         str(tmp_path / "out"), "--domain", f"d={source}", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"d: skipped {source / 'gone.txt'} (dangling symlink)" in out
    assert f"d: skipped {source / 'linked'} (symlinked folder, not followed)" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {entry["why"] for entry in manifest["domains"][0]["skipped_inputs"]} == {
        "dangling symlink", "symlinked folder, not followed"}
    assert manifest["domains"][0]["files"] == 2


def test_output_through_a_symlink_is_written_into_its_target(tokenizer, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    _prepare(tokenizer, _corpus(tmp_path / "src"), link)
    assert link.is_symlink() and (target / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder may be left"


@pytest.mark.slow  # starts a process
def test_output_onto_a_mount_point(tokenizer, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert os.path.ismount(mount)
        _prepare(tokenizer, _corpus(tmp_path / "src"), mount)
        assert (mount / "manifest.json").is_file()
        _prepare(tokenizer, _corpus(tmp_path / "src"), mount, overwrite=True)  # replaced in place, still mounted
        assert os.path.ismount(mount) and sorted(p.name for p in mount.iterdir()) == ["d", "manifest.json"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_unwritable_or_full_outputs_fail_in_one_line_before_the_work(tokenizer, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root: simulate the read-only folder instead
            def refuse(self, *args, **kwargs):
                raise PermissionError(13, "Permission denied", str(self))
            monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(OutputError, match=f"cannot write {locked / 'out'}: Permission denied"):
            with staged_directory(locked / "out"):
                pytest.fail("the work must not start")
    finally:
        monkeypatch.undo()
        locked.chmod(0o700)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 10))
    code = prepare_main(["--tokenizer", str(tokenizer), "--seq-len", "16", "--eval-sequences", "1", "--out",
                         str(tmp_path / "out"), "--domain", f"d={_corpus(tmp_path / 'src')}", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not enough free space" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # starts a process
def test_staging_of_a_dead_process_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-0123abcd"
    (stale / "half").mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getpid()}-0123abcd"  # this process: alive, kept
    live.mkdir()
    assert remove_stale_staging(out) == [stale]
    assert not stale.exists() and live.exists()
    with staged_directory(out) as staging:
        (staging / "file").write_text("x")
    assert (out / "file").read_text() == "x"


def test_tiny_assets_record_real_paths_and_refuse_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not tiny assets"):
        make_tiny_assets(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assets = make_tiny_assets(tmp_path / "assets")
    manifest = json.loads((assets / "mds" / "manifest.json").read_text())
    assert manifest["tokenizer"] == str((assets / "tokenizer").resolve())
    assert all(Path(source).exists() for domain in manifest["domains"] for source in domain["sources"])


def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(tokenizer, tmp_path, monkeypatch):
    import drpruning.data.tokenize as prepare

    words = ["river", "delta\n", "glacier  ", "x=1;", "\n\nend", "Kernel\t", "übung"]
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 4000))
    pieces = prepare.text_pieces(text, 500)
    assert "".join(pieces) == text and len(pieces) > 10 and max(map(len, pieces)) <= 500
    source = tmp_path / "src"
    source.mkdir()
    (source / "long.txt").write_text(text)
    _prepare(tokenizer, source, tmp_path / "whole")
    monkeypatch.setattr(prepare, "PIECE_CHARS", 500)
    calls = []
    monkeypatch.setattr(prepare, "text_pieces", lambda text, size: calls.append(size) or pieces)
    _prepare(tokenizer, source, tmp_path / "pieces")
    assert calls == [500]
    np.testing.assert_array_equal(_tokens(tmp_path / "whole"), _tokens(tmp_path / "pieces"))


def test_export_checks_its_output_before_loading_anything(tmp_path, capsys):
    from drpruning.export.convert import main as prune_to_dense_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert prune_to_dense_main([str(tmp_path / "no-such-run"), str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {blocker / 'out'}"), err
