"""`scripts/eval.py yamls/eval/downstream.yaml` runs LLM-Foundry's ICL evaluation on an exported-style folder.

The folder holds a stock HF model and its tokenizer side by side, as `scripts/prune_to_dense.py` and
`hf_checkpointer` write them; the run is single-process on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from drpruning.demo.tiny import make_tiny_tokenizer, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
TASK_FILE = REPO / "yamls" / "eval" / "tasks" / "tiny_mc.jsonl"


def markdown_column(output: str, row_label: str, column: str) -> str:
    """The cell of `column` in the first markdown table row that names `row_label`."""
    table = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if row_label in cells:
            return cells[header.index(column)]
    raise AssertionError(f"no row {row_label!r} in:\n{output}")


def test_tiny_task_file_is_well_formed() -> None:
    rows = [json.loads(line) for line in TASK_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 20
    for row in rows:
        assert set(row) == {"query", "choices", "gold"}
        assert 0 <= row["gold"] < len(row["choices"]) and len(set(row["choices"])) == len(row["choices"])


def test_icl_accuracy_is_reported(tmp_path: Path) -> None:
    model_dir = tmp_path / "exported"
    make_tiny_tokenizer(model_dir)
    save_tiny_model("llama_gqa", model_dir, vocab_size=512)
    command = [
        sys.executable, str(REPO / "scripts" / "eval.py"), str(REPO / "yamls" / "eval" / "downstream.yaml"),
        f"variables.model_dir={model_dir}", f"variables.tasks_dir={REPO / 'yamls' / 'eval' / 'tasks'}",
        "precision=fp32", "max_seq_len=128", "python_log_level=null",
    ]
    # foundry writes a copy of each task file into the working directory: keep it out of the repo
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    accuracy = float(markdown_column(result.stdout, "tiny_mc", "Accuracy"))
    assert 0.0 <= accuracy <= 1.0
    assert markdown_column(result.stdout, "tiny_mc", "Number few shot") == "0-shot"
    assert "InContextLearningMultipleChoiceAccuracy" in result.stderr + result.stdout

