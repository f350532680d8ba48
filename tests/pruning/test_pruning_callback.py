"""The `pruning` callback's optimizer check (ascent for the multipliers, own learning rates for the masks) and
the mask statistics it logs each step."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from composer import Trainer
from transformers import AutoTokenizer

from drpruning.demo.tiny import tiny_config
from drpruning.metrics_logger import JSONLMetricsLogger
from drpruning.pruning.callback import PruningCallback, check_optimizer_groups
from drpruning.pruning.masks import L0Module
from drpruning.pruning.model import DRPruningCausalLM
from drpruning.pruning.shapes import ModelShape


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.l0_module = L0Module(ModelShape.from_hf_config(tiny_config("llama_gqa")), {"n_layers": 2}, ["layer"])


def _groups(model, lambda_lr=-1.0, gate_lr=1.0, split=True):
    lambdas = [p for n, p in model.named_parameters() if "lambda_" in n]
    gates = [p for n, p in model.named_parameters() if "gates." in n]
    base = [model.linear.weight, model.linear.bias]
    if not split:
        return torch.optim.AdamW([{"params": base + lambdas + gates}], lr=1e-4)
    return torch.optim.AdamW([{"params": base}, {"params": lambdas, "lr": lambda_lr},
                              {"params": gates, "lr": gate_lr}], lr=1e-4)


def test_correct_groups_pass_and_leave_the_optimizer_unchanged():
    model = _Model()
    optimizer = _groups(model)
    before = [(len(g["params"]), g["lr"]) for g in optimizer.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # own learning rates for masks and multipliers: not even a warning
        check_optimizer_groups(model, optimizer)
    assert [(len(g["params"]), g["lr"]) for g in optimizer.param_groups] == before


def test_multipliers_without_ascent_are_rejected():
    model = _Model()
    with pytest.raises(ValueError, match="negative lr"):
        check_optimizer_groups(model, _groups(model, lambda_lr=1.0))


def test_missing_param_groups_are_rejected_with_the_yaml_to_use():
    model = _Model()
    with pytest.raises(ValueError, match="param_str_match"):
        check_optimizer_groups(model, _groups(model, split=False))


def test_masks_at_the_model_lr_warn():
    model = _Model()
    with pytest.warns(UserWarning, match="mask gates train at the model's lr"):
        check_optimizer_groups(model, _groups(model, gate_lr=1e-4))


def test_export_finds_the_callback_state_under_the_key_composer_saves_it_by():
    from drpruning.runs import PRUNING_STATE_KEY

    assert PRUNING_STATE_KEY == PruningCallback.__name__  # Composer keys callback state by class name


def test_the_mask_statistics_are_logged_once_per_batch_at_the_step_of_its_losses(tiny_assets, tmp_path, monkeypatch):
    """Two microbatches per batch: one `metrics/pruning/*` record per batch, at the step Composer logs that
    batch's `loss/train/*`, holding that batch's forward (the multipliers before the optimizer step)."""
    monkeypatch.chdir(tmp_path)  # the run folder defaults to runs/<run_name>
    source = tiny_assets / "llama_gqa"
    target = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}
    model = DRPruningCausalLM(tokenizer=AutoTokenizer.from_pretrained(source), pretrained_model_name_or_path=str(source),
                              l0_module={"target": target, "lagrangian_warmup": "2ba"})
    ids = torch.randint(0, 512, (12, 16), generator=torch.Generator().manual_seed(0))
    batches = torch.utils.data.DataLoader([{"input_ids": row, "labels": row.clone()} for row in ids], batch_size=4)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in params.items() if "l0_module." not in n]},
        {"params": [p for n, p in params.items() if "l0_module.lambda_" in n], "lr": -0.1, "weight_decay": 0.0},
        {"params": [p for n, p in params.items() if "l0_module.gates." in n], "lr": 0.1, "weight_decay": 0.0},
    ], lr=1e-4)
    Trainer(model=model, train_dataloader=batches, max_duration="3ba", optimizers=optimizer,
            device_train_microbatch_size=2, callbacks=[PruningCallback(save_masks=False)],
            loggers=[JSONLMetricsLogger(folder=str(tmp_path / "run"))], device="cpu", progress_bar=False).fit()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    def logged(key: str) -> list[tuple[int, float]]:
        return [(record["step"], record[key]) for record in records if key in record]

    keys = {f"metrics/pruning/{stat}/{module}" for module in model.l0_module.pruning_modules
            for stat in ("expected_sparsity", "target_sparsity", "lambda_1", "lambda_2")}
    keys.add("metrics/pruning/expected_params")
    assert {key for record in records for key in record if key.startswith("metrics/pruning/")} == keys
    for key in keys:
        assert [step for step, _ in logged(key)] == [0, 1, 2], key
    assert [step for step, _ in logged("loss/train/lm_loss")] == [0, 1, 2]
    assert {key for record in records for key in record if key.startswith("loss/train/")} == {
        "loss/train/total", "loss/train/lm_loss", "loss/train/lagrangian_loss"}
    final = model.l0_module.final_sparsity["head"]
    assert [value for _, value in logged("metrics/pruning/target_sparsity/head")] == pytest.approx(
        [0.0, final / 2, final])
    lambdas = [value for _, value in logged("metrics/pruning/lambda_1/head")]
    assert lambdas[0] == 0.0 and lambdas[1] != 0.0, "the multipliers of each step's forward, before its update"
    assert lambdas[2] != float(model.l0_module.lambda_1["head"]), "step 2's forward, not the multiplier after it"
