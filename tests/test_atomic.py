"""`staged_directory`: a folder appears whole or not at all, and nothing of the staging is left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from drpruning.atomic import replace_directory, staged_directory


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_success_moves_the_staging_folder_into_place(tmp_path):
    out = tmp_path / "nested" / "out"
    with staged_directory(out) as staging:
        assert staging.parent == out.parent and staging.is_dir() and not any(staging.iterdir())
        assert not out.exists(), "nothing appears before the block ends"
        (staging / "sub").mkdir()
        (staging / "sub" / "data.bin").write_bytes(b"new")
    assert _tree(out) == {"sub/data.bin": b"new"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "no staging folder is left"
    probe = tmp_path / "probe"
    probe.mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode), "mkdir's mode, not mkdtemp's 0700"


@pytest.mark.parametrize("existing", [None, "empty", "full"])
def test_an_exception_leaves_the_destination_untouched_and_no_staging(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    if existing == "full":
        (out / "keep.txt").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), staged_directory(out) as staging:
        (staging / "half.txt").write_text("half-written")
        raise RuntimeError("boom")
    assert _tree(tmp_path) == before
    assert out.is_dir() == bool(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if existing is None else ["out"])


def test_a_failing_install_leaves_the_destination_untouched_and_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def refuse(staging: Path, destination: Path) -> None:
        raise RuntimeError("the destination changed meanwhile")

    with pytest.raises(RuntimeError, match="changed meanwhile"), staged_directory(out, refuse) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(tmp_path) == {"out/keep.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", ["empty", "full", "file"])
def test_the_default_install_replaces_the_destination_as_a_whole(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("a file")
    else:
        out.mkdir()
        if existing == "full":
            (out / "old.txt").write_text("old")
            (out / "sub").mkdir()
            (out / "sub" / "old.bin").write_bytes(b"old")
    with staged_directory(out) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": b"new"}, "nothing of the old destination survives"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging or retired folder is left"


def test_a_custom_install_decides_what_of_the_destination_survives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ours.txt").write_text("old")
    (out / "NOTES.md").write_text("the user's")

    def merge(staging: Path, destination: Path) -> None:
        (staging / "ours.txt").replace(destination / "ours.txt")

    with staged_directory(out, merge) as staging:
        (staging / "ours.txt").write_text("new")
        (staging / "scratch.tmp").write_text("left in the staging folder")
    assert _tree(out) == {"NOTES.md": b"the user's", "ours.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "what the install left is removed"


def test_replace_directory_puts_the_old_folder_back_when_the_new_one_cannot_move(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_directory(tmp_path / "missing-staging", out)
    assert _tree(tmp_path) == {"out/keep.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
