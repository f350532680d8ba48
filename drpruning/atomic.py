"""Write a folder all or nothing: build it in a staging folder beside its destination, then move it into place.

Readers of a destination (a prepared data set, an export, a demo model) never see it half-written, and a
failure — an exception, a failed check, Ctrl-C — leaves the destination as it was and no staging folder behind.
What an existing destination may be replaced with is the caller's decision: it checks before it writes
(and again in its `install`, since the folder may have been filled while the staging folder was built).

- A destination that is a symlink is written through: the link's target is the destination, the link stays.
- A destination that is a mount point cannot be renamed: staging then happens inside it (a hidden folder)
  and the finished entries are moved in one by one.
- Before the long work, the staging folder is created (so an unwritable destination fails at once) and the
  free space is compared with what the caller expects to write; a full disk or a read-only file system
  met later is one `OutputError` line too, never a traceback.
- Staging folders left by a process that no longer runs (kill -9) are removed by the next write.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from drpruning.errors import OutputError

STAGING_TAG = "partial"
RETIRED_TAG = "old"
_STAGING_NAME = re.compile(rf"^\.(?P<name>.+)\.{STAGING_TAG}-(?P<pid>\d+)-[0-9a-f]{{8}}$")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def is_scratch_name(name: str) -> bool:
    """A staging or retired folder of this module (hidden): never an output, never a user's file."""
    return name.startswith(".") and (f".{STAGING_TAG}-" in name or f".{RETIRED_TAG}-" in name)


def destination(out_dir: str | Path) -> Path:
    """Where an output folder really is: a symlink's target (written through), else the path itself."""
    out_dir = Path(out_dir)
    return out_dir.resolve() if out_dir.is_symlink() else out_dir


def scratch_parent(out_dir: Path) -> Path:
    """The folder that holds staging and retired folders: beside `out_dir`, or inside it on a mount point."""
    return out_dir if os.path.ismount(out_dir) else out_dir.parent


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete staging folders of `out_dir` whose process is gone (same host); returns what was removed."""
    parent = scratch_parent(out_dir)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _STAGING_NAME.match(entry.name)
        if match and match["name"] == out_dir.name and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def refuse_foreign_folder(out_dir: str | Path, marker: str, what: str) -> None:
    """`OutputError` when `out_dir` holds files but not `marker`: a folder this tool did not write, which
    replacing as a whole would delete (an earlier attempt of the tool never lands there half-written)."""
    out_dir = destination(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and not (out_dir / marker).exists() and _entries(out_dir):
        raise OutputError(f"{out_dir} holds files that are not {what} (no {marker}); choose an empty or new folder")


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not is_scratch_name(p.name)]


def _replace_mount_point(staging: Path, out_dir: Path) -> None:
    """`replace_directory` for a mount point: retire its entries inside it, move the staged ones in."""
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{RETIRED_TAG}-", dir=out_dir))
    old = _entries(out_dir)
    for entry in old:
        os.replace(entry, retired / entry.name)
    try:
        for entry in staging.iterdir():
            os.replace(entry, out_dir / entry.name)
    except BaseException:  # put the old entries back where the new ones did not land
        for entry in old:
            if not (out_dir / entry.name).exists():
                os.replace(retired / entry.name, out_dir / entry.name)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def replace_directory(staging: Path, out_dir: Path) -> None:
    """Put `staging` at `out_dir`, replacing whatever is there as a whole (the caller has decided it may go).

    An existing destination is first renamed aside and deleted only once the new folder is in place, so an
    interruption between the two renames leaves the old folder in `.NAME.old-*`, not deleted."""
    if os.path.ismount(out_dir):
        _replace_mount_point(staging, out_dir)
        return
    if not os.path.lexists(out_dir) or (out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())):
        os.replace(staging, out_dir)  # one step; rename(2) fails rather than replace a folder filled meanwhile
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{RETIRED_TAG}-", dir=scratch_parent(out_dir)))
    os.replace(out_dir, retired / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(retired / out_dir.name, out_dir)  # put the old folder back
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


def preflight(out_dir: str | Path, need_bytes: int = 0) -> None:
    """Fail now, in one line, if `out_dir` cannot be written or lacks `need_bytes` of free space: before work
    that takes minutes (loading and folding a model, a calibration pass), not after it."""
    with staged_directory(out_dir, install=lambda staging, out: None, need_bytes=need_bytes):
        pass


@contextmanager
def staged_directory(
    out_dir: str | Path, install: Callable[[Path, Path], None] = replace_directory, *, need_bytes: int = 0
) -> Iterator[Path]:
    """Yield an empty staging folder for `out_dir`; when the block succeeds, `install(staging, destination)`.

    `install` defaults to replacing the destination as a whole; a caller that must keep files it did not
    write, or check the destination once more, passes its own (it receives `destination(out_dir)`: a
    symlink's target). `need_bytes`: what the caller expects to write; less free space than that is refused
    before any work. The staging folder is removed whatever happens (after a successful install it no
    longer exists; an install may also leave parts of it behind)."""
    out_dir = destination(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        # Not tempfile.mkdtemp: its 0700 mode would become the destination's; mkdir honours the umask.
        staging = scratch_parent(out_dir) / f".{out_dir.name}.{STAGING_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise OutputError(f"cannot write {out_dir}: {error.strerror or error}") from None
    try:
        free = shutil.disk_usage(staging).free
        if need_bytes > free:
            raise OutputError(f"not enough free space for {out_dir}: about {need_bytes / 2**20:,.0f} MiB needed, "
                              f"{free / 2**20:,.0f} MiB free")  # fmt: skip
        try:
            yield staging
            install(staging, out_dir)
        except OSError as error:
            if error.errno in _WRITE_ERRNOS:
                raise OutputError(f"cannot write {out_dir}: {error.strerror}") from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
