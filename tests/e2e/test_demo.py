"""`make demo`'s pipeline in its shortened form: every stage runs and hands its output to the next."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf as om

from drpruning.demo import corpus as demo_corpus
from drpruning.pruning.shapes import ModelShape, target_shape
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_quick_demo_joins_all_stages_and_reuses_them(tmp_path: Path, smollm2_dir: Path) -> None:
    out = tmp_path / "demo"
    # The session's SmolLM2 export, hard-linked where the source stage writes it (which then finds it complete).
    shutil.copytree(smollm2_dir, out / "source", copy_function=os.link)
    command = [sys.executable, "scripts/demo.py", "--quick", "--out", str(out)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in ("source", "data", "prune", "export", "cpt", "eval", "report"):
        assert (out / "stages" / f"{stage}.done").exists(), stage

    # The export that continued pretraining loads has exactly the pruning recipe's target shape.
    l0_config = om.to_container(om.load(REPO / "yamls" / "demo" / "prune_smollm2.yaml").model.l0_module)
    source = ModelShape.from_hf_config(json.loads((out / "source" / "config.json").read_text()))
    pruned = ModelShape.from_hf_config(json.loads((out / "pruned" / "config.json").read_text()))
    assert pruned == target_shape(source, l0_config["target"], l0_config["pruning_modules"])
    assert pruned.num_params() < source.num_params()
    results = json.loads((out / "eval.json").read_text())
    domains = demo_corpus.domains()
    assert len(domains) >= 5
    for model in ("source", "pruned", "continued"):
        assert list(results[model]["domains"]) == domains
    report = (out / "report.md").read_text()
    assert all(f"| {model} |" in report for model in ("source", "pruned", "continued"))
    assert (out / "prune" / "plots" / "README.md").exists()

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("done before, reusing") == 7
