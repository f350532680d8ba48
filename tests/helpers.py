"""Helpers the tests import (fixtures live in conftest.py): the repository root and a `composer` launch."""

from __future__ import annotations

import os
import subprocess

import pytest

from drpruning.demo.pipeline import REPO, train_command

__all__ = ["REPO", "run_training"]


def run_training(yaml: str, overrides: list[str], *, ranks: int = 2, env: dict[str, str] | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """`composer -n ranks scripts/train.py yaml overrides...` from the repo root; fails the test with the log."""
    command = train_command(yaml, overrides, ranks)
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result
