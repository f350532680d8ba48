"""Importance from a calibration pass, gates ordered by it, and the one-shot baseline (in-process, tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from composer import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpruning.demo.tiny import tiny_model
from drpruning.errors import CalibrationError, ShapeError
from drpruning.export.one_shot import main as one_shot_main, one_shot_prune
from drpruning.pruning import importance as importance_module
from drpruning.pruning.calibration import CalibrationConfig, calibration_sequences
from drpruning.pruning.callback import PruningCallback
from drpruning.pruning.importance import (
    calibrate,
    compute_importance,
    importance_for_run,
    write_importance,
)
from drpruning.pruning.masks import L0Module, gate_scores
from drpruning.pruning.model import DRPruningCausalLM
from drpruning.pruning.prunable import make_prunable
from drpruning.pruning.shapes import ModelShape

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}
SEQUENCES = torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calibration(assets, **overrides) -> CalibrationConfig:
    return CalibrationConfig(**{"data_dir": str(assets / "mds"), "num_sequences": 8, "batch_size": 4, **overrides})


def test_units_that_write_nothing_score_zero_and_last():
    """Each measure sees what removing a unit removes: a dead KV group, FFN unit, hidden channel or block."""
    model = tiny_model("llama_gqa", vocab_size=300)
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.o_proj.weight[:, 64:] = 0  # KV group 1 of layer 0 (query heads 4..7 x 16 dims)
        layers[1].mlp.down_proj.weight[:, 7] = 0  # FFN unit 7 of layer 1
        for norm in [model.model.norm] + [n for layer in layers for n in (layer.input_layernorm,
                                                                           layer.post_attention_layernorm)]:
            norm.weight[5] = 0  # hidden channel 5 is never read
        layers[2].self_attn.o_proj.weight.zero_()  # block 2 adds nothing to the residual stream
        layers[2].mlp.down_proj.weight.zero_()
    for measure in ("cosine", "drop_loss"):
        scores = compute_importance(model, SEQUENCES, batch_size=4, layer_measure=measure).scores
        assert scores["head"][0, 1] == 0 and scores["head"][0, 0] > 0
        assert scores["intermediate"][1, 7] == 0 and scores["intermediate"][1].argmin() == 7
        assert scores["hidden"][5] == 0 and (scores["hidden"] > 0).sum() == 63
        assert abs(float(scores["layer"][2])) < 1e-6, scores["layer"]  # (dropping a random block may help)
        assert measure == "drop_loss" or scores["layer"].argmin() == 2
        assert {name: tuple(v.shape) for name, v in scores.items()} == {
            "layer": (4,), "head": (4, 2), "intermediate": (4, 128), "hidden": (64,)}


def test_intermediate_and_head_scores_are_the_squared_contribution():
    """E[a_j^2] * |W_down[:, j]|^2 and E|o_proj(group)|^2, checked against a direct computation."""
    model = tiny_model("qwen2", vocab_size=300)
    scores = compute_importance(model, SEQUENCES, batch_size=6).scores
    captured = {}
    layer = model.model.layers[1]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("a", a[0])),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))]
    with torch.no_grad():
        model(input_ids=SEQUENCES, use_cache=False)
    for hook in hooks:
        hook.remove()
    a, x = captured["a"].flatten(0, 1).double(), captured["x"].flatten(0, 1).double()
    expected_units = a.pow(2).mean(0) * layer.mlp.down_proj.weight.double().pow(2).sum(0)
    torch.testing.assert_close(scores["intermediate"][1], expected_units, rtol=1e-5, atol=0)
    weight = layer.self_attn.o_proj.weight.double()
    group = (x[:, 64:] @ weight[:, 64:].T).pow(2).sum(-1).mean()  # KV group 1 = query heads 4..7
    torch.testing.assert_close(scores["head"][1, 1], group, rtol=1e-5, atol=0)


def test_pass_is_deterministic_batch_invariant_and_leaves_the_model_as_it_was():
    model = tiny_model("qwen2", vocab_size=300).train()
    state = make_prunable(model, ModelShape.from_hf_config(model.config))
    masks = {"hidden": (torch.arange(64) < 40).float()}
    state.set(masks)
    with torch.no_grad():
        before = model(input_ids=SEQUENCES[:2], use_cache=False).logits
    first = compute_importance(model, SEQUENCES, batch_size=2).scores
    second = compute_importance(model, SEQUENCES, batch_size=4).scores
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-6, atol=1e-12)
        assert torch.equal(first[name].argsort(), compute_importance(model, SEQUENCES, batch_size=2)
                           .scores[name].argsort())
    # measured without the masks (the source model), which are back in place afterwards, as is train mode
    assert first["hidden"][40:].min() > 0
    assert model.training and state.hidden is masks["hidden"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=SEQUENCES[:2], use_cache=False).logits, before)


def test_meta_weights_and_bad_sequences_fail_clearly():
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_model("qwen2", vocab_size=300).config)
    with pytest.raises(CalibrationError, match="meta"):
        compute_importance(meta, SEQUENCES)
    with pytest.raises(CalibrationError, match=r"\[N ≥ 1, S ≥ 2\]"):
        compute_importance(tiny_model("qwen2", vocab_size=300), SEQUENCES[:, :1])
    with pytest.raises(CalibrationError, match="layer_measure"):
        compute_importance(tiny_model("qwen2", vocab_size=300), SEQUENCES, layer_measure="angular")


def test_calibration_sequences_are_seeded_equal_shares(tiny_assets):
    sequences, counts = calibration_sequences(_calibration(tiny_assets, num_sequences=10))
    assert counts == {"prose": 3, "code": 3, "math": 2, "facts": 2} and sequences.shape == (10, 64)
    again, _ = calibration_sequences(_calibration(tiny_assets, num_sequences=10))
    assert torch.equal(sequences, again)
    other, _ = calibration_sequences(_calibration(tiny_assets, num_sequences=10, seed=1))
    assert not torch.equal(sequences, other)
    short, counts = calibration_sequences(_calibration(tiny_assets, num_sequences=3, domains=("math",),
                                                       max_seq_len=20))  # fmt: skip
    assert counts == {"math": 3} and short.shape == (3, 20)


@pytest.mark.parametrize("values,message", [
    ({}, "needs l0_module.calibration.data_dir"),
    ({"data_dir": "x", "sequences": 4}, "unknown calibration keys"),
    ({"data_dir": "x", "num_sequences": 0}, "num_sequences=0"),
    ({"data_dir": "x", "layer_measure": "angular"}, "layer_measure"),
    ({"data_dir": "x", "seed": -1}, "seed=-1"),
])  # fmt: skip
def test_bad_calibration_settings_fail_with_one_line(values, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationConfig.from_dict(values)


def test_bad_calibration_data_fails_clearly(tiny_assets, tmp_path):
    with pytest.raises(CalibrationError, match="no manifest.json"):
        calibration_sequences(_calibration(tiny_assets, data_dir=str(tmp_path)))
    with pytest.raises(CalibrationError, match="unknown domain"):
        calibration_sequences(_calibration(tiny_assets, domains=("poetry",)))
    with pytest.raises(CalibrationError, match="fewer than"):
        calibration_sequences(_calibration(tiny_assets, num_sequences=10**6))


# ---- gates ordered by importance --------------------------------------------------------------------------


def _random_importance(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = {"layer": (shape.n_layers,), "head": (shape.n_layers, shape.n_kv_heads),
             "intermediate": (shape.n_layers, shape.intermediate_size), "hidden": (shape.hidden_size,)}  # fmt: skip
    return {name: torch.rand(size, generator=generator, dtype=torch.float64) for name, size in sizes.items()}


def test_ordered_gates_keep_the_most_important_units_at_the_uniform_level():
    shape = ModelShape.from_hf_config(tiny_model("llama_gqa").config)
    importance = _random_importance(shape)
    uniform = L0Module(shape, TARGET)
    ordered = L0Module(shape, TARGET, init="importance")
    ordered.order_gates_(importance)
    masks = ordered.target_masks()
    for name, scores in importance.items():
        keep = ordered.keep[name]
        expected = torch.zeros_like(scores).scatter_(-1, scores.argsort(-1, descending=True)[..., :keep], 1.0)
        assert torch.equal(masks[name], expected.float()), name
        log_alpha = ordered.gates[name].detach()
        assert math.isclose(float(log_alpha.max()), ordered.init_log_alpha, rel_tol=1e-6)
        assert math.isclose(float(log_alpha.min()), ordered.init_log_alpha - ordered.init_band, rel_tol=1e-6)
        # every score within 0.015 of the uniform start's, so the expected size starts where it does today
        difference = gate_scores(uniform.gates[name]).detach() - gate_scores(log_alpha)
        assert 0 <= float(difference.max()) < 0.015
    ordered.train_step, uniform.train_step = 0, 0
    lagrangian_gap = (ordered()[2]["expected_params"] - uniform()[2]["expected_params"]) / shape.num_params()
    assert abs(float(lagrangian_gap)) < 0.015
    # the size the gates expect (what evals score) starts within a unit per row of the uniform start's
    for name, kept in L0Module.mean_kept_per_row(ordered.current_masks()).items():
        assert L0Module.mean_kept_per_row(uniform.current_masks())[name] - kept <= 1, name


def test_ties_go_to_the_lower_index_and_bad_importance_is_rejected():
    shape = ModelShape.from_hf_config(tiny_model("llama_gqa").config)
    ordered = L0Module(shape, TARGET, init="importance")
    flat = {name: torch.zeros_like(value) for name, value in _random_importance(shape).items()}
    ordered.order_gates_(flat)
    assert ordered.target_masks()["layer"].tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ShapeError, match="no scores for"):
        ordered.order_gates_({"layer": flat["layer"]})
    with pytest.raises(ShapeError, match="importance of hidden has shape"):
        ordered.order_gates_({**flat, "hidden": torch.zeros(3)})
    with pytest.raises(ShapeError, match="non-finite"):
        ordered.order_gates_({**flat, "head": torch.full_like(flat["head"], math.nan)})
    with pytest.raises(ShapeError, match="init='random'"):
        L0Module(shape, TARGET, init="random")
    with pytest.raises(ShapeError, match="below"):
        L0Module(shape, TARGET, init="importance", init_band=20.0)
    with pytest.raises(ShapeError, match="positive"):
        L0Module(shape, TARGET, init="importance", init_band=0)


def test_model_config_requires_calibration_only_with_importance_init(tiny_assets):
    source = str(tiny_assets / "llama_gqa")
    tokenizer = AutoTokenizer.from_pretrained(source)
    with pytest.raises(CalibrationError, match="calibration.data_dir"):
        DRPruningCausalLM(tokenizer=tokenizer, pretrained_model_name_or_path=source,
                          l0_module={"target": TARGET, "init": "importance"})  # fmt: skip
    with pytest.raises(ValueError, match="only read with l0_module.init: importance"):
        DRPruningCausalLM(tokenizer=tokenizer, pretrained_model_name_or_path=source,
                          l0_module={"target": TARGET, "calibration": {"data_dir": "x"}})  # fmt: skip


# ---- in a run: Event.INIT, the cache, resume --------------------------------------------------------------


def test_run_importance_is_cached_and_reused_only_for_the_same_settings(tiny_assets, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "llama_gqa")
    config = _calibration(tiny_assets)
    first = importance_for_run(model, config, tmp_path, source="src")
    assert not (tmp_path / "importance.pt").exists(), "the callback writes it at FIT_START, not the pass"
    write_importance(first, tmp_path)
    summary = json.loads((tmp_path / "importance.json").read_text())
    assert summary["cost"]["sequences"] == 8 and summary["cost"]["forward_passes"] == 1
    assert summary["meta"]["sequences_per_domain"] == {"prose": 2, "code": 2, "math": 2, "facts": 2}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(importance_module, "calibrate", fail)
    again = importance_for_run(model, config, tmp_path, source="src")
    assert all(torch.equal(first.scores[m], again.scores[m]) for m in first.scores)
    for changed in (_calibration(tiny_assets, seed=3), config):
        if changed is config:  # same settings, other weights
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.mul_(2)
        with pytest.raises(CalibrationError, match="recomputed"):
            importance_for_run(model, changed, tmp_path, source="src")


def _composer_model(assets, **l0) -> DRPruningCausalLM:
    source = str(assets / "llama_gqa")
    return DRPruningCausalLM(
        tokenizer=AutoTokenizer.from_pretrained(source), pretrained_model_name_or_path=source,
        l0_module={"target": TARGET, "init": "importance",
                   "calibration": {"data_dir": str(assets / "mds"), "num_sequences": 8}, **l0},
    )  # fmt: skip


def _trainer(model: DRPruningCausalLM, folder, **kwargs) -> Trainer:
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if "l0_module." not in n]},
              {"params": [p for n, p in named.items() if "l0_module.lambda_" in n], "lr": -0.1},
              {"params": [p for n, p in named.items() if "l0_module.gates." in n], "lr": 0.5}]  # fmt: skip
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)
    return Trainer(model=model, train_dataloader=loader, optimizers=torch.optim.Adam(groups, lr=1e-3),
                   save_folder=str(folder), device="cpu", progress_bar=False, callbacks=[PruningCallback()],
                   **kwargs)  # fmt: skip


def test_callback_orders_gates_at_init_and_a_resumed_run_keeps_its_checkpointed_gates(tiny_assets, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    run = tmp_path / "run"
    model = _composer_model(tiny_assets)
    trainer = _trainer(model, run, max_duration="2ba", save_interval="2ba")
    assert not (run / "importance.pt").exists(), "nothing is written into the run folder before FIT_START"
    ordered = {n: p.detach().clone() for n, p in model.l0_module.gates.items()}
    trainer.fit()
    step0 = torch.load(run / "masks" / "ba0.pt")
    importance = torch.load(run / "importance.pt", weights_only=False)["scores"]
    for name, mask in step0.items():  # the step-0 target masks are the importance top-k
        keep = model.l0_module.keep[name]
        top = importance[name].argsort(dim=-1, descending=True, stable=True)[..., :keep]
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, top, 1.0)), name
    trained = {n: p.detach().clone() for n, p in model.l0_module.gates.items()}
    assert any(not torch.equal(trained[n], ordered[n]) for n in trained), "training should move the gates"
    trainer.close()
    saved = torch.load(run / "ep0-ba2-rank0.pt", weights_only=False)["state"]
    assert saved["callbacks"]["PruningCallback"]["importance"]["cost"]["sequences"] == 8

    def fail(*args, **kwargs):
        raise AssertionError("a resumed run recomputed the importance")

    monkeypatch.setattr(importance_module, "calibrate", fail)
    resumed_model = _composer_model(tiny_assets)
    resumed = _trainer(resumed_model, run, max_duration="3ba", save_interval="3ba",
                       load_path=str(run / "ep0-ba2-rank0.pt"))  # fmt: skip
    for name, gates in resumed_model.l0_module.gates.items():
        assert torch.equal(gates.detach(), trained[name]), f"{name}: the checkpoint's gates must win"
    resumed.close()


# ---- one-shot ---------------------------------------------------------------------------------------------


def test_one_shot_keeps_the_importance_top_k_and_matches_the_masked_model(tiny_assets, tmp_path):
    source = tiny_assets / "qwen2"
    out = one_shot_prune(source, TARGET, _calibration(tiny_assets), tmp_path / "one-shot")
    summary = json.loads((out / "pruning.json").read_text())
    assert summary["method"] == "one-shot importance" and summary["step"] == 0
    assert summary["exported_shape"] == TARGET and summary["target_shape"] == TARGET
    assert summary["verification"]["max_abs_logit_diff"] <= summary["verification"]["tolerance"]
    assert summary["importance"]["cost"]["sequences"] == 8
    model = AutoModelForCausalLM.from_pretrained(source)
    scores = calibrate(model, _calibration(tiny_assets)).scores
    assert summary["kept"]["hidden"] == sorted(scores["hidden"].argsort(descending=True)[:48].tolist())
    assert [layer["source_layer"] for layer in summary["kept"]["layers"]] == sorted(
        scores["layer"].argsort(descending=True)[:3].tolist())
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    assert ModelShape.from_hf_config(dense.config).target_dict() == TARGET
    assert (out / "tokenizer.json").exists()


def test_one_shot_cli_errors_are_one_line(tiny_assets, tmp_path, capsys):
    base = [str(tiny_assets / "qwen2"), str(tmp_path / "out"), "--data", str(tiny_assets / "mds")]
    assert one_shot_main([*base, "--target", "n_layers=three"]) == 2
    assert "--target item 'n_layers=three'" in capsys.readouterr().err
    assert one_shot_main([*base, "--target", "n_layers=9"]) == 2
    assert "larger than the source" in capsys.readouterr().err
    assert one_shot_main([*base, "--target", "n_layers=3", "--domains", "poetry"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
