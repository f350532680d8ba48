"""The GPU check (benchmarks/gpu_check.py) stays runnable: its --quick CPU mode, with Composer, LLM-Foundry
and streaming made unimportable as on the bare GPU machine it is written for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the GPU machine lacks; a `None` entry in sys.modules makes `import name` raise ImportError.
ABSENT = ("composer", "llmfoundry", "streaming")
RUNNER = (
    "import runpy, sys\n"
    f"for name in {ABSENT!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.parametrize("one_at_a_time", ["no", "yes"])
@pytest.mark.slow  # starts a process
def test_quick_mode_writes_one_table_without_composer(tmp_path, one_at_a_time):
    out = tmp_path / "gpu_check.md"
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out),
         "--one-at-a-time", one_at_a_time, "--fsdp1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = out.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in table[2:]]
    assert [row["case"] for row in rows] == ["llama-tiny", "smollm2-tiny"]
    for row in rows:
        assert float(row["step ms stock"]) > 0 and float(row["step ms masked"]) > 0
        assert float(row["tokens/s masked"].replace(",", "")) > 0
        # masks cleared, the masked forward is the stock forward exactly
        assert float(row["max abs logit diff, masks off"]) == 0.0
    assert "transformers" in lines[0] and "fp32" in lines[0]
    assert ("one model at a time" in lines[0]) == (one_at_a_time == "yes")
    assert lines[-1] == "Composer/FSDP1 section: skipped (composer, llmfoundry, streaming not installed here)."


@pytest.mark.slow  # starts a process
def test_full_mode_without_cuda_is_one_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x.md")],
        capture_output=True, text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and not (tmp_path / "x.md").exists()
