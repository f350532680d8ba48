"""`make demo`'s pipeline in its shortened form: every stage runs and hands its output to the next."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from drpruning.demo import corpus as demo_corpus
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_quick_demo_joins_all_stages_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "scripts/demo.py", "--quick", "--out", str(out)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in ("source", "data", "prune", "export", "cpt", "eval", "report"):
        assert (out / "stages" / f"{stage}.done").exists(), stage

    pruned = json.loads((out / "pruned" / "config.json").read_text())
    assert (pruned["num_hidden_layers"], pruned["hidden_size"], pruned["num_attention_heads"],
            pruned["num_key_value_heads"], pruned["intermediate_size"]) == (20, 384, 6, 2, 1024)
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
