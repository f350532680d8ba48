"""Write a folder all or nothing: build it in a staging folder beside its destination, then move it into place.

Readers of a destination (a prepared data set, an export, a demo model) never see it half-written, and a
failure — an exception, a failed check, Ctrl-C — leaves the destination as it was and no staging folder behind.
What an existing destination may be replaced with is the caller's decision: it checks before it writes
(and again in its `install`, since the folder may have been filled while the staging folder was built).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_TAG = "partial"
RETIRED_TAG = "old"


def replace_directory(staging: Path, out_dir: Path) -> None:
    """Put `staging` at `out_dir`, replacing whatever is there as a whole (the caller has decided it may go).

    An existing destination is first renamed aside and deleted only once the new folder is in place, so an
    interruption between the two renames leaves the old folder in `.NAME.old-*`, not deleted."""
    if not os.path.lexists(out_dir) or (out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())):
        os.replace(staging, out_dir)  # one step; rename(2) fails rather than replace a folder filled meanwhile
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{RETIRED_TAG}-", dir=out_dir.parent))
    os.replace(out_dir, retired / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(retired / out_dir.name, out_dir)  # put the old folder back
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_directory(
    out_dir: str | Path, install: Callable[[Path, Path], None] = replace_directory
) -> Iterator[Path]:
    """Yield an empty staging folder beside `out_dir`; when the block succeeds, `install(staging, out_dir)`.

    `install` defaults to replacing `out_dir` as a whole; a caller that must keep files it did not write, or
    check the destination once more, passes its own. The staging folder is removed whatever happens (after a
    successful install it no longer exists; an install may also leave parts of it behind)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would become the destination's; mkdir honours the umask.
    staging = out_dir.with_name(f".{out_dir.name}.{STAGING_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
