"""Shared fixtures: tiny offline assets (tokenizer, tiny Llama/Qwen2 source models, a four-domain MDS set).

Helpers that tests import (the repository root, a `composer` launch) are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from drpruning.demo.tiny import make_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets")
