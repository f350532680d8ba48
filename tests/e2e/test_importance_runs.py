"""Importance init in real `composer -n 2` runs: its step-0 masks are the one-shot script's kept units."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpruning.pruning.calibration import CalibrationConfig
from drpruning.pruning.importance import calibrate
from drpruning.pruning.masks import L0Module
from drpruning.pruning.shapes import ModelShape
from tests.helpers import REPO, run_training

pytestmark = pytest.mark.slow

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}
CALIBRATION = {"num_sequences": 8, "seed": 5, "batch_size": 4}


def _importance_run(assets, folder) -> list[str]:
    return [
        f"variables.assets={assets}", f"save_folder={folder}", "max_duration=2ba", "variables.update_interval=2",
        "save_interval=2ba", "model.l0_module.lagrangian_warmup=2ba", "scheduler.t_warmup=1ba",
        "callbacks.data_scheduler.min_points=5", "model.l0_module.init=importance",
        f"model.l0_module.calibration.data_dir={assets / 'mds'}",
        *(f"model.l0_module.calibration.{key}={value}" for key, value in CALIBRATION.items()),
    ]


def _kept(masks: dict[str, torch.Tensor]) -> dict:
    """The kept units of target masks, in `pruning.json`'s `kept` layout."""
    layers = masks["layer"].nonzero().flatten().tolist()
    return {
        "hidden": masks["hidden"].nonzero().flatten().tolist(),
        "layers": [{"source_layer": layer, "kv_heads": masks["head"][layer].nonzero().flatten().tolist(),
                    "intermediate": masks["intermediate"][layer].nonzero().flatten().tolist()}
                   for layer in layers],
    }  # fmt: skip


def test_ddp_run_with_importance_init_starts_from_the_one_shot_selection(tiny_assets, tmp_path):
    run = tmp_path / "run"
    run_training("yamls/tiny/prune_llama_gqa.yaml", _importance_run(tiny_assets, run))
    step0 = torch.load(run / "masks" / "ba0.pt")
    assert (run / "masks" / "ba2.pt").exists() and (run / "ep0-ba2-rank0.pt").exists()
    summary = json.loads((run / "importance.json").read_text())
    assert summary["cost"]["sequences"] == 8 and summary["meta"]["calibration"]["seed"] == 5

    out = tmp_path / "one-shot"
    target = [f"{key}={value}" for key, value in TARGET.items()]
    command = [sys.executable, str(REPO / "scripts" / "one_shot_prune.py"), str(tiny_assets / "llama_gqa"), str(out),
               "--data", str(tiny_assets / "mds"), "--num-sequences", "8", "--seed", "5", "--batch-size", "4",
               "--target", *target]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    one_shot = json.loads((out / "pruning.json").read_text())
    assert _kept(step0) == one_shot["kept"]


def test_fsdp2_mixed_init_run_orders_gates_from_rank_zero(tiny_assets, tmp_path):
    """Under `init_device: mixed` only rank 0 holds weights: it calibrates, the other ranks receive the result."""
    run = tmp_path / "run"
    run_training(
        "yamls/tiny/prune_qwen2.yaml",
        [*_importance_run(tiny_assets, run), "fsdp_config.sharding_strategy=FULL_SHARD",
         "fsdp_config.state_dict_type=full", "fsdp_config.sync_module_states=true", "model.init_device=mixed"],
        env={"FSDP_VERSION": "2"},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "qwen2")
    config = CalibrationConfig(data_dir=str(tiny_assets / "mds"), **CALIBRATION)
    l0 = L0Module(ModelShape.from_hf_config(model.config), TARGET, init="importance")
    l0.order_gates_(calibrate(model, config).scores)
    assert _kept(torch.load(run / "masks" / "ba0.pt")) == _kept(l0.target_masks())
    assert (run / "ep0-ba2-rank0.pt").exists()
