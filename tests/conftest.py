"""Shared fixtures: tiny offline assets (tokenizer, tiny Llama/Qwen2 source models, a four-domain MDS set)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drpruning.tiny_models import make_tiny_assets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets")


def run_training(yaml: str, overrides: list[str], *, ranks: int = 2, env: dict[str, str] | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """`composer -n ranks scripts/train.py yaml overrides...` from the repo root; fails the test with the log."""
    launcher = Path(sys.executable).with_name("composer")
    command = [str(launcher), "-n", str(ranks), "scripts/train.py", yaml, *overrides]
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result
