"""`evaluate_domains` / `scripts/eval_domains.py` on a tiny model and a tiny prepared data folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import LocalDataset
from transformers import AutoModelForCausalLM

from drpruning.demo.tiny import make_tiny_mds, save_tiny_model
from drpruning.evaluation import evaluate_domains, main

SEQ_LEN = 32
EVAL_SEQUENCES = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_assets")
    data = make_tiny_mds(root, n_domains=2, seq_len=SEQ_LEN, eval_sequences=EVAL_SEQUENCES, docs_per_domain=40)
    model_dir = save_tiny_model("qwen2", root / "model", vocab_size=512)
    return model_dir, data


def hand_computed_loss(model_dir: Path, split_dir: Path) -> tuple[float, int]:
    """Mean next-token CE in float64, one sequence at a time, straight from the MDS shard."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dataset = LocalDataset(local=str(split_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            ids = torch.tensor(np.asarray(dataset[i]["tokens"], dtype=np.int64))[None]
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total -= float(log_probs.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total / count, count


def test_loss_equals_hand_computed_cross_entropy(assets: tuple[Path, Path]) -> None:
    model_dir, data = assets
    report = evaluate_domains(model_dir, data, batch_size=3, device="cpu")  # 5 sequences: a ragged last batch
    assert list(report["domains"]) == ["prose", "code"]
    for domain, result in report["domains"].items():
        expected, tokens = hand_computed_loss(model_dir, data / domain / "eval")
        assert result["tokens"] == tokens == EVAL_SEQUENCES * (SEQ_LEN - 1)
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    losses = {d: r["loss"] for d, r in report["domains"].items()}
    assert report["average_loss"] == pytest.approx(sum(losses.values()) / len(losses))
    assert report["worst_domain"] == {"name": max(losses, key=losses.get), "loss": max(losses.values())}


def test_in_memory_model_and_sequence_cap(assets: tuple[Path, Path]) -> None:
    model_dir, data = assets
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    report = evaluate_domains(model, data, domains=["code"], max_sequences=2)
    assert list(report["domains"]) == ["code"]
    assert report["domains"]["code"]["tokens"] == 2 * (SEQ_LEN - 1)
    assert model.training, "the caller's train/eval mode is restored"


def test_cli_writes_json_and_table(assets: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, data = assets
    out = tmp_path / "report.json"
    assert main([str(model_dir), str(data), "--out", str(out), "--max-sequences", "1", "--batch-size", "1"]) == 0
    report = json.loads(out.read_text())
    assert set(report["domains"]) == {"prose", "code"}
    assert all(r["tokens"] == SEQ_LEN - 1 for r in report["domains"].values())
    printed = capsys.readouterr().out
    assert "prose" in printed and "worst domain:" in printed


def test_missing_data_dir(assets: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        evaluate_domains(assets[0], tmp_path / "does-not-exist")


def test_folder_without_manifest(assets: tuple[Path, Path], tmp_path: Path) -> None:
    shutil.copytree(assets[1] / "code", tmp_path / "code")
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        evaluate_domains(assets[0], tmp_path)


def test_unknown_domain(assets: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"'wiki' is not in .*known: \['prose', 'code'\]"):
        evaluate_domains(assets[0], assets[1], domains=["wiki"])


def test_missing_split_files(assets: tuple[Path, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(assets[1], data)
    shutil.rmtree(data / "prose" / "eval")
    with pytest.raises(FileNotFoundError, match="no MDS index"):
        evaluate_domains(assets[0], data)


def test_not_a_model_folder(assets: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), str(assets[1])]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
