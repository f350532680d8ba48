"""Each subpackage's `__all__` is its public API: every name resolves, and the light modules stay light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

SUBPACKAGES = ["drpruning.pruning", "drpruning.scheduling", "drpruning.data", "drpruning.demo", "drpruning.export"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_public_name_resolves(name: str) -> None:
    package = importlib.import_module(name)
    assert package.__all__, f"{name} declares no public API"
    for attribute in package.__all__:
        value = getattr(package, attribute)
        assert getattr(value, "__module__", name).startswith(name) or not callable(value), (name, attribute)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_shapes_masks_and_distributions_import_without_composer() -> None:
    """The GPU check script imports these on a machine with torch but no Composer or LLM-Foundry."""
    code = ("import sys, drpruning.pruning, drpruning.pruning.masks, drpruning.pruning.shapes, "
            "drpruning.distributions, drpruning.errors; "
            "heavy = sorted(m for m in ('composer', 'llmfoundry', 'streaming') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
