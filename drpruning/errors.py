"""Every error a user sees, in one place, and how scripts report them.

Validation code raises `ConfigError` (a `ValueError`, so existing `except ValueError` callers keep
working) for mistakes a user can fix from the message alone: a bad target, policy, proportions, reference
losses, data folder, update interval, optimizer groups, run folder. Its subclasses name the stage that
refused the input. The script entry points catch it and print `error: <message>` once instead of a
traceback; anything else is a bug and keeps its traceback.

The `RuntimeError`s below are about the world rather than the configuration: a checkpoint that cannot be
exported, a remote file that does not match its index, a missing SmolLM2 package.
"""

from __future__ import annotations

import os
import sys
import time

CONFIG_ERROR_EXIT_CODE = 2
# How long a non-zero rank waits before exiting on a config error: every rank hits the same error, and the
# `composer` launcher prints the whole log of any rank that exits non-zero by itself (hundreds of lines),
# but not of ranks it terminates after rank 0 has failed.
_OTHER_RANKS_GRACE_S = 20.0


class ConfigError(ValueError):
    """A configuration or input mistake the message fully explains; scripts report it in one line."""


class DataDirError(ConfigError, FileNotFoundError):
    """A data folder that is missing or incomplete (also a `FileNotFoundError`, which older callers expect)."""


class DataPrepError(ConfigError):
    """Bad input to data preparation; the message names the offending file, domain or option."""


class ShapeError(ConfigError):
    """A target shape or pruning configuration that cannot be honoured."""


class CalibrationError(ConfigError):
    """Calibration settings or data that cannot produce an importance pass."""


class OutputError(ConfigError):
    """An output folder that cannot be written: not writable, too little free space, a full disk."""


class UnsafeFileError(ConfigError):
    """A pickled file (checkpoint, importance cache) that names code to run when loaded; it is not loaded."""


class ExportError(RuntimeError):
    """The checkpoint, masks or output directory cannot produce a correct dense export."""


class RemoteDataError(RuntimeError):
    """A remote file that cannot be fetched or does not match its index; the message names it."""


class SmolLM2Error(RuntimeError):
    """The GGUF source is unavailable or the export does not match SmolLM2-135M."""


def report_error(error: BaseException | str, prog: str | None = None) -> int:
    """Print one `[prog: ]error: <message>` line and return the one exit code every script uses for a user
    error (2, as argparse's). For single-process scripts; a distributed run uses `report_config_error`."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT_CODE


def _global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report_config_error(error: ConfigError, prog: str | None = None) -> int:
    """Print `[prog: ]error: <message>` once and return the exit code for config errors (2).

    Every rank of a distributed run meets the same error. Rank 0 prints it; the others first wait, so
    that the launcher, which stops the remaining ranks once rank 0 has exited, ends them quietly instead
    of echoing their whole log. A rank that outlives the wait (rank 0 did not fail) prints it too.
    """
    if _global_rank() != 0 and "LOCAL_WORLD_SIZE" in os.environ:
        time.sleep(_OTHER_RANKS_GRACE_S)
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT_CODE
