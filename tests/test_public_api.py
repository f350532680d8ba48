"""Each subpackage's `__all__` is its public API: every name resolves, and the light modules stay light."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow  # starts a process
def test_shapes_masks_and_distributions_import_without_composer() -> None:
    """benchmarks/gpu_check.py imports these on a machine with torch and transformers but no Composer."""
    code = ("import sys, drpruning.pruning, drpruning.pruning.masks, drpruning.pruning.shapes, drpruning.pruning.prunable, "
            "drpruning.distributions, drpruning.errors; "
            "heavy = sorted(m for m in ('composer', 'llmfoundry', 'streaming') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _drpruning_imports(path: Path) -> set[str]:
    """The drpruning modules a source file imports (at any depth, including TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drpruning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("drpruning"))
    return found


# Which parts of the library each part may import: the method's halves and the data they meet do not
# reach into each other's maths or into export, and nothing in the library imports the demo.
LAYERS = {
    "pruning": {"pruning", "data", "errors", "runs", "distributions", "safe_load", "_lazy", "losses"},
    "data": {"data", "errors", "runs", "distributions", "atomic", "_lazy"},
    "scheduling": {"scheduling", "errors", "runs", "distributions", "_lazy"},
    "export": {"export", "pruning", "errors", "runs", "atomic", "safe_load", "_lazy"},
}


# The top-level modules: leaves (errors, the run folder, atomic writes, safe loading) import almost nothing;
# the tools over a run (plots, evaluation) read the parts they report on and nothing above them.
TOP_LEVEL = {
    "errors": set(), "_lazy": set(), "losses": set(), "distributions": {"errors"}, "runs": {"errors"}, "atomic": {"errors"},
    "safe_load": {"errors"}, "launch": {"errors", "safe_load"}, "metrics_logger": {"runs", "errors"},
    "run_data": {"runs", "pruning"}, "plots": {"errors", "runs", "run_data"},
    "evaluation": {"errors", "data", "losses"},
    "config_checks": {"errors", "data", "pruning"},
}


@pytest.mark.parametrize("module", sorted(TOP_LEVEL))
def test_top_level_modules_import_only_what_they_report_on(module: str) -> None:
    imported = {m.split(".")[1] for m in _drpruning_imports(REPO / "drpruning" / f"{module}.py") if "." in m}
    assert imported <= TOP_LEVEL[module], f"drpruning/{module}.py imports {sorted(imported - TOP_LEVEL[module])}"


def test_every_top_level_module_is_layered() -> None:
    modules = {p.stem for p in (REPO / "drpruning").glob("*.py")} - {"__init__"}
    assert modules == set(TOP_LEVEL), sorted(modules ^ set(TOP_LEVEL))


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_imports_point_one_way(part: str) -> None:
    offending = []
    for path in sorted((REPO / "drpruning" / part).rglob("*.py")):
        for module in _drpruning_imports(path):
            target = module.split(".")[1] if "." in module else module
            if target not in LAYERS[part]:
                offending.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offending, "\n".join(offending)


def test_nothing_in_the_library_imports_the_demo() -> None:
    library = [p for p in (REPO / "drpruning").rglob("*.py") if "demo" not in p.relative_to(REPO).parts]
    offending = [f"{p.relative_to(REPO)} imports {m}" for p in library for m in _drpruning_imports(p)
                 if m.startswith("drpruning.demo")]
    assert not offending, "\n".join(offending)
