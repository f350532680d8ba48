"""What `scripts/train.py` checks before it hands the config to LLM-Foundry.

- **One writer per run folder.** Global rank 0 takes an exclusive `flock` on `<save_folder>/.drpruning.lock`
  and keeps it for the life of the process. A second run on the folder is refused at once, naming the
  folder and the run that holds it. The kernel drops the lock when its process dies, `kill -9` included,
  so a killed run never leaves it stuck.
- **A resume checkpoint that is intact and safe.** Composer resumes with `torch.load(weights_only=False)`.
  The checkpoint it would read (`load_path`, or with `autoresume` the folder's `latest-rank0.pt`) is first
  read here through `drpruning.safe_load` (memory-mapped: no tensor data is read). A crafted file is
  refused. With `autoresume`, a truncated or unreadable newest checkpoint is named in one line and the run
  resumes from the newest intact one.

Remote `save_folder` / `load_path` (`s3://...`) are left to Composer.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from drpruning.errors import ConfigError, UnsafeFileError
from drpruning.safe_load import DCP_METADATA_PREFIXES, load_pickle, load_torch_file

log = logging.getLogger(__name__)

LOCK_FILE = ".drpruning.lock"
LATEST_CHECKPOINT = "latest-rank0.pt"
_CHECKPOINT_FILE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


def _is_remote(path: str) -> bool:
    return "://" in path


_HELD: list[RunLock] = []  # a lock lives as long as its open file: kept here for the life of the process


class RunLock:
    """The run folder's lock, held by this process until it exits (or `abandon` on a refused start)."""

    def __init__(self, folder: Path, handle: IO[str], created_folder: bool, created_file: bool, previous: str):
        self.folder, self.path, self._handle = folder, folder / LOCK_FILE, handle
        self._created_folder, self._created_file, self._previous = created_folder, created_file, previous

    def abandon(self) -> None:
        """A start that was refused leaves nothing behind: the lock file and the folder, if it made them."""
        if self._created_file:
            self.path.unlink(missing_ok=True)
        else:  # the last holder's line, as it was
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(self._previous)
            self._handle.flush()
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if still empty
            except OSError:
                pass
        self._handle.close()
        if self in _HELD:
            _HELD.remove(self)


def acquire_run_lock(save_folder: str | None, run_name: str | None = None) -> RunLock | None:
    """Take the run folder's lock for this process (global rank 0 only); `ConfigError` if a live run holds it."""
    if not save_folder or _is_remote(save_folder) or int(os.environ.get("RANK", "0")) != 0:
        return None
    folder = Path(save_folder)
    created_folder = not folder.exists()
    created_file = created_folder or not (folder / LOCK_FILE).exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK_FILE).open("a+", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"save_folder {folder} cannot be written: {error.strerror or error}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"save_folder {folder} is in use by a live run ({holder}); two runs on one folder would mix their logs "
            "and checkpoints: wait for it to end, stop it, or choose another save_folder"
        ) from None
    handle.seek(0)
    previous = handle.read()
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    handle.write(json.dumps({"run_name": run_name, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": started}) + "\n")  # fmt: skip
    handle.flush()
    lock = RunLock(folder, handle, created_folder, created_file, previous)
    _HELD.append(lock)
    return lock


def check_checkpoint(path: Path) -> None:
    """Read a local checkpoint as Composer would, without running code from it; raises on a bad one."""
    if path.is_dir():
        load_pickle(path / ".metadata", DCP_METADATA_PREFIXES)
    else:
        load_torch_file(path, "a Composer checkpoint", mmap=True)


def _intact(path: Path) -> str | None:
    """None if `path` is a readable, safe checkpoint, else why not (one line). Unsafe files raise."""
    try:
        check_checkpoint(path)
    except UnsafeFileError:
        raise
    except (ValueError, OSError) as error:
        return str(error)
    return None


def _checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [(int(m[2]), int(m[1]), p) for p in folder.iterdir() if (m := _CHECKPOINT_FILE.match(p.name))]
    return [p for *_, p in sorted(found, reverse=True)]


def choose_resume_checkpoint(cfg: DictConfig) -> None:
    """Check the checkpoint this run would resume from; with autoresume, fall back past broken ones.

    Changes `cfg` only when falling back: `load_path` is set to the newest intact checkpoint and
    `autoresume` turned off, which makes Composer load exactly that file, and `save_overwrite` turned on, so
    that the broken checkpoints named after it are replaced when the run reaches their steps (every later
    checkpoint is broken: the chosen one is the newest intact)."""
    save_folder = cfg.get("save_folder")
    latest = Path(str(save_folder)) / LATEST_CHECKPOINT if save_folder and not _is_remote(str(save_folder)) else None
    if not cfg.get("autoresume") or latest is None or not (latest.exists() or latest.is_symlink()):
        return _check_load_path(cfg.get("load_path"))  # nothing to resume: Composer reads load_path, if any
    newest = latest.resolve()
    problem = _intact(newest) if latest.exists() else f"{latest} points to {newest}, which does not exist"
    if problem is None:
        return None
    for candidate in _checkpoints_newest_first(latest.parent):
        if candidate.resolve() != newest and _intact(candidate) is None:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"warning: autoresume: {problem}; resuming from {candidate}, the newest intact checkpoint "
                      "(the unreadable ones after it are overwritten as the run reaches their steps)", flush=True)
            # save_overwrite: otherwise Composer refuses to start beside the broken, later-named files.
            cfg.load_path, cfg.autoresume, cfg.save_overwrite = str(candidate), False, True
            return None
    raise ConfigError(f"autoresume: no intact checkpoint in {latest.parent}; the newest: {problem}")


def _check_load_path(load_path: Any) -> None:
    if not load_path or _is_remote(str(load_path)):
        return
    path = Path(str(load_path))
    if not path.exists():
        raise ConfigError(f"load_path {path} does not exist")
    problem = _intact(path)
    if problem is not None:
        raise ConfigError(f"load_path: {problem}")
