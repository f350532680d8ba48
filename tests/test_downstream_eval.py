"""`scripts/eval.py yamls/eval/downstream.yaml` runs LLM-Foundry's ICL evaluation on an exported-style folder.

The folder holds a stock HF model and its tokenizer side by side, as `scripts/prune_to_dense.py` and
`hf_checkpointer` write them; the run is single-process on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

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


def choice_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, query: str,
                  choices: list[str]) -> list[float]:
    """Mean log-likelihood per token of each choice after the 0-shot prompt, computed with the model directly.

    This is the multiple-choice score LLM-Foundry documents (lowest per-token perplexity of the
    continuation wins): the prompt is the query with trailing space stripped, the choice follows with a
    leading space only where the tokenizer encodes " a" as one token (GPT-2 style BPE), and every
    choice token is predicted from the position before it.
    """
    prefix = " " if len(tokenizer(" a", add_special_tokens=False)["input_ids"]) == 1 else ""
    context = tokenizer("")["input_ids"] + tokenizer(query.rstrip(), add_special_tokens=False)["input_ids"]
    scores = []
    for choice in choices:
        continuation = tokenizer(prefix + choice, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([context + continuation])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=tokens).logits[0].float(), dim=-1)
        predicted_at = torch.arange(len(context) - 1, tokens.shape[1] - 1)
        scores.append(float(log_probs[predicted_at, tokens[0, predicted_at + 1]].mean()))
    return scores


def relabelled_task(rows: list[dict], scores: list[list[float]], min_margin: float = 1e-3) -> tuple[list[dict], float]:
    """The rows whose top choice is clear, three quarters labelled with the model's top choice and the rest
    with its bottom one, and the accuracy that labelling implies.

    Neither "every answer right" nor a reversed ranking (picking the least likely choice) gives that
    accuracy, and a pick that moves on any row changes it.
    """
    clear = [(row, s) for row, s in zip(rows, scores, strict=True) if sorted(s)[-1] - sorted(s)[-2] > min_margin]
    top_labelled = round(0.75 * len(clear))
    relabelled = []
    for index, (row, s) in enumerate(clear):
        gold = s.index(max(s)) if index < top_labelled else s.index(min(s))
        relabelled.append({**row, "gold": gold})
    return relabelled, top_labelled / len(clear)


def test_tiny_task_file_is_well_formed() -> None:
    rows = [json.loads(line) for line in TASK_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 20
    for row in rows:
        assert set(row) == {"query", "choices", "gold"}
        assert 0 <= row["gold"] < len(row["choices"]) and len(set(row["choices"])) == len(row["choices"])


@pytest.mark.slow  # starts a process
def test_icl_accuracy_matches_scores_computed_by_hand(tmp_path: Path) -> None:
    """The reported accuracy is the one the model's own choice scores imply, on a task labelled from them."""
    model_dir = tmp_path / "exported"
    tokenizer = make_tiny_tokenizer(model_dir)
    save_tiny_model("llama_gqa", model_dir, vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    rows = [json.loads(line) for line in TASK_FILE.read_text(encoding="utf-8").splitlines()]
    scores = [choice_scores(model, tokenizer, row["query"], row["choices"]) for row in rows]
    relabelled, expected_accuracy = relabelled_task(rows, scores)
    assert len(relabelled) >= 12, "too few rows with a clear top choice for the check to mean anything"
    assert len({row["gold"] for row in relabelled}) > 1, "the model prefers one position everywhere"
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / TASK_FILE.name).write_text("".join(json.dumps(row) + "\n" for row in relabelled), encoding="utf-8")

    command = [
        sys.executable, str(REPO / "scripts" / "eval.py"), str(REPO / "yamls" / "eval" / "downstream.yaml"),
        f"variables.model_dir={model_dir}", f"variables.tasks_dir={tasks_dir}",
        "precision=fp32", "max_seq_len=128", "python_log_level=null",
    ]
    # foundry writes a copy of each task file into the working directory: keep it out of the repo
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    accuracy = float(markdown_column(result.stdout, "tiny_mc", "Accuracy"))
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-6)
    assert markdown_column(result.stdout, "tiny_mc", "Number few shot") == "0-shot"
    assert "InContextLearningMultipleChoiceAccuracy" in result.stderr + result.stdout
