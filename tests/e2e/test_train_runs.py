"""Multi-process CPU runs of the tiny recipes through `composer -n 2` (DDP and FSDP2 over gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from drpruning.evaluation import evaluate_domains
from tests.helpers import run_training

pytestmark = pytest.mark.slow


def _train_metric(run, name: str) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line[name] for line in lines if name in line]


def _assert_masks_and_multipliers_trained(run) -> None:
    """The gates and multipliers really receive updates through the distributed wrapper."""
    sparsity = _train_metric(run, "metrics/pruning/expected_sparsity/layer")
    lambdas = _train_metric(run, "metrics/pruning/lambda_1/layer")
    assert sparsity[-1] > sparsity[0] + 1e-3, sparsity
    assert lambdas[0] == 0.0 and lambdas[-1] != 0.0, lambdas


def _short(assets, folder, steps=8, interval=4) -> list[str]:
    return [
        f"variables.assets={assets}", f"save_folder={folder}", f"max_duration={steps}ba",
        f"variables.update_interval={interval}", f"save_interval={interval}ba",
        f"model.l0_module.lagrangian_warmup={interval}ba", "scheduler.t_warmup=2ba",
        "callbacks.data_scheduler.min_points=5",
    ]


def test_ddp_pruning_run_writes_masks_schedule_and_checkpoints(tiny_assets, tmp_path):
    run = tmp_path / "run"
    run_training("yamls/tiny/prune_llama_gqa.yaml", _short(tiny_assets, run))
    assert (run / "ep0-ba8-rank0.pt").exists() and (run / "ep0-ba4-rank0.pt").exists()
    masks = torch.load(run / "masks" / "ba8.pt")
    assert masks["layer"].sum() == 3 and masks["hidden"].sum() == 48
    assert (masks["head"].sum(-1) == 1).all() and (masks["intermediate"].sum(-1) == 96).all()
    meta = json.loads((run / "masks" / "meta.json").read_text())
    assert meta["l0"]["target_shape"]["hidden_size"] == 48
    lines = [json.loads(line) for line in (run / "schedule.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8]
    assert all(abs(sum(line["proportions"].values()) - 1) < 1e-9 for line in lines)
    _assert_masks_and_multipliers_trained(run)
    # The eval before step 1 measures the source model (all gates open), as `reference_losses: source` needs.
    source = evaluate_domains(str(tiny_assets / "llama_gqa"), tiny_assets / "mds")
    first_eval = _train_metric(run, "metrics/eval/prose/LanguageCrossEntropy")[0]
    assert abs(first_eval - source["domains"]["prose"]["loss"]) < 1e-4
    assert abs(lines[0]["reference_losses"]["prose"] - source["domains"]["prose"]["loss"]) < 1e-4
    checkpoint = torch.load(run / "ep0-ba8-rank0.pt", weights_only=False)
    assert checkpoint["state"]["callbacks"]["PruningCallback"]["l0"]["target_params"] > 0


def test_fsdp2_pruning_run_on_cpu(tiny_assets, tmp_path):
    run = tmp_path / "run"
    run_training(
        "yamls/tiny/prune_qwen2.yaml",
        [*_short(tiny_assets, run), "fsdp_config.sharding_strategy=FULL_SHARD",
         "fsdp_config.state_dict_type=full",
         # the recipes' clipping, which the pruning callback narrows to the sharded weights
         "algorithms.gradient_clipping.clipping_type=norm", "algorithms.gradient_clipping.clipping_threshold=1.0"],
        env={"FSDP_VERSION": "2"},
    )
    masks = torch.load(run / "masks" / "ba8.pt")
    assert masks["layer"].sum() == 3 and (masks["head"].sum(-1) == 1).all()
    assert (run / "ep0-ba8-rank0.pt").exists()
    _assert_masks_and_multipliers_trained(run)
