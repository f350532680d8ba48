"""The `pruning` callback's optimizer check: ascent for the multipliers, own learning rates for the masks."""

from __future__ import annotations

import warnings

import pytest
import torch

from drpruning.demo.tiny import tiny_config
from drpruning.pruning.callback import check_optimizer_groups
from drpruning.pruning.masks import L0Module
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
    from drpruning.pruning.callback import PruningCallback
    from drpruning.runs import PRUNING_STATE_KEY

    assert PRUNING_STATE_KEY == PruningCallback.__name__  # Composer keys callback state by class name
