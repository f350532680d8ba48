"""Hard-concrete gates, expected size, the Lagrangian, and target validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpruning.demo.tiny import tiny_config
from drpruning.errors import ShapeError
from drpruning.pruning.masks import L0Module, gate_scores, sample_gates, top_k_mask
from drpruning.pruning.shapes import PRUNING_MODULES, ModelShape, target_shape

ALL = PRUNING_MODULES


@pytest.mark.parametrize(
    "kind,overrides",
    [("llama_mha", {}), ("llama_gqa", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}),
     ("qwen2", {"tie_word_embeddings": False})],
)
def test_num_params_matches_hf_model(kind, overrides):
    config = tiny_config(kind, **overrides)
    shape = ModelShape.from_hf_config(config)
    model = AutoModelForCausalLM.from_config(config)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_expected_params_is_exact_for_binary_scores(kind):
    config = tiny_config(kind)
    source = ModelShape.from_hf_config(config)
    target = {"n_layers": 3, "hidden_size": 40, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}
    l0 = L0Module(source, target, ALL)
    scores = {m: top_k_mask(torch.randn_like(p), l0.keep[m]) for m, p in l0.gates.items()}
    dense = dataclasses.replace(source, **target)
    brute_force = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        type(config)(**{**config.to_dict(), **dense.hf_config_updates()})).parameters())
    assert int(l0.expected_params(scores)) == brute_force == dense.num_params()
    assert l0.describe()["target_params"] == brute_force


def test_gates_start_open_and_scores_match_sampling_frequency():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5, 4.6])
    draws = torch.stack([sample_gates(log_alpha) for _ in range(20000)])
    assert torch.allclose((draws > 0).float().mean(0), gate_scores(log_alpha), atol=0.01)
    assert draws.min() >= 0 and draws.max() <= 1
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 2}, ["layer"])
    assert gate_scores(l0.gates["layer"]).min() > 0.99, "every gate starts open: the pruned model starts as the source"


def test_target_masks_keep_exact_counts_per_row():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "intermediate_size": 100}, ALL,
                  eval_masks="target")
    with torch.no_grad():
        for p in l0.gates.values():
            p.normal_()
    masks = l0.eval().deterministic_masks()
    for m, mask in l0.target_masks().items():
        assert torch.equal(mask, masks[m])  # eval_masks: target is the old behaviour: the final shape
    assert masks["layer"].sum() == 3 and masks["hidden"].sum() == 48
    assert (masks["head"].sum(-1) == 1).all() and (masks["intermediate"].sum(-1) == 100).all()
    # the kept units are the highest-scoring ones
    head_scores = l0.gates["head"]
    assert (head_scores[masks["head"] == 1] >= head_scores.max(-1).values - 1e-6).all()


def test_current_masks_keep_the_expected_count_per_row_top_by_score():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "intermediate_size": 100}, ALL)
    assert l0.eval_masks == "current"  # the method's default (reference scripts: eval_target_model false)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in l0.gates.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 3)
    masks, _, _ = l0.eval()()
    for m, log_alpha in l0.gates.items():
        scores = gate_scores(log_alpha.detach()).reshape(-1, log_alpha.shape[-1])
        mask = masks[m].reshape(scores.shape)
        expected_keep = scores.sum(-1).round().clamp(min=1)  # a row always keeps one unit
        assert torch.equal(mask.sum(-1), expected_keep), m
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        for row in range(scores.shape[0]):  # every kept unit outscores every dropped one
            kept, dropped = scores[row][mask[row] == 1], scores[row][mask[row] == 0]
            if dropped.numel():
                assert kept.min() >= dropped.max()
    assert not torch.equal(masks["intermediate"], l0.target_masks()["intermediate"])
    assert l0.last_target_masks is not None and torch.equal(l0.last_target_masks["head"], l0.target_masks()["head"])
    # rows of one mask keep their own counts: the model that is scored, not a uniform shape
    assert l0.mean_kept_per_row(masks)["intermediate"] == pytest.approx(float(masks["intermediate"].sum(-1).mean()))


def test_current_masks_with_fresh_gates_are_almost_the_source():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "intermediate_size": 100}, ALL)
    kept = l0.mean_kept_per_row(l0.current_masks())
    sizes = {"layer": source.n_layers, "head": source.n_kv_heads, "intermediate": source.intermediate_size,
             "hidden": source.hidden_size}
    for m, size in sizes.items():  # P(z > 0) ≈ 0.998 at the start: at most 0.2 % of the units are left out
        assert size * 0.997 <= kept[m] <= size
    assert l0.mean_kept_per_row(l0.target_masks())["intermediate"] == 100


def test_eval_masks_option_is_checked():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    with pytest.raises(ShapeError, match="eval_masks"):
        L0Module(source, {"n_layers": 3}, ["layer"], eval_masks="final")


def test_lagrangian_drives_expected_sparsity_to_target():
    """A short real loop: masks at lr 1.0, lambdas by ascent; every module lands within 1% of its target."""
    torch.manual_seed(0)
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 3, "hidden_size": 32, "n_heads": 4, "intermediate_size": 64}, ALL,
                  lagrangian_warmup=40).train()
    optimizer = torch.optim.AdamW([
        {"params": list(l0.gates.parameters()), "lr": 0.1},
        {"params": list(l0.lambda_1.parameters()) + list(l0.lambda_2.parameters()), "lr": -0.1},
    ], weight_decay=0.0)
    for step in range(400):
        l0.train_step = step
        _, lagrangian, stats = l0()
        optimizer.zero_grad()
        lagrangian.backward()
        optimizer.step()
        l0.clamp_log_alpha_()
    for m, target in l0.final_sparsity.items():
        assert abs(float(stats[f"expected_sparsity/{m}"]) - target) < 0.01, (m, stats)


def test_lambdas_ascend_while_constraint_is_violated():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"intermediate_size": 32}, ["intermediate"], lagrangian_warmup=0).train()
    optimizer = torch.optim.SGD([
        {"params": [l0.gates["intermediate"]], "lr": 1.0},
        {"params": [l0.lambda_1["intermediate"], l0.lambda_2["intermediate"]], "lr": -0.5},
    ])
    l0.train_step = 0
    lambdas = []
    for _ in range(3):
        _, lagrangian, stats = l0()
        optimizer.zero_grad()
        lagrangian.backward()
        optimizer.step()
        lambdas.append(float(l0.lambda_1["intermediate"]))
    gap = float(stats["expected_sparsity/intermediate"]) - l0.final_sparsity["intermediate"]
    assert gap < 0, "gates start open, so expected sparsity is below target"
    # d lagrangian / d lambda_1 = gap < 0, so ascent makes lambda_1 go *down* (more negative) each step
    assert lambdas[0] < 0 and lambdas[1] < lambdas[0] and lambdas[2] < lambdas[1]
    assert l0.lambda_1["intermediate"].shape == (1,), "lambdas are [1], not scalars (FSDP2)"


def test_target_warmup_is_linear():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 2}, ["layer"], lagrangian_warmup=100)
    assert l0.target_sparsity(0)["layer"] == 0.0
    assert l0.target_sparsity(50)["layer"] == pytest.approx(0.25)
    assert l0.target_sparsity(500)["layer"] == pytest.approx(0.5)
    with pytest.raises(ShapeError, match="the model reads yaml durations"):
        L0Module(source, {"n_layers": 2}, ["layer"], lagrangian_warmup="100ba")  # type: ignore[arg-type]


def test_training_without_step_says_which_callback_is_missing():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    l0 = L0Module(source, {"n_layers": 2}, ["layer"]).train()
    with pytest.raises(RuntimeError, match="pruning"):
        l0()


@pytest.mark.parametrize(
    "target,modules,message",
    [
        ({"n_layers": 5}, ALL, "larger than the source"),
        ({"hidden_size": 0}, ALL, "zero units"),
        ({"n_heads": 6, "n_kv_heads": 2}, ALL, "query heads per KV group"),
        ({"n_heads": 5}, ALL, "not a multiple"),
        ({"intermediate_size": 64}, ["layer", "head"], "does not include"),
        ({"n_layer": 2}, ALL, "unknown target keys"),
        ({"n_layers": 2}, ["layers"], "unknown pruning_modules"),
        ({"n_layers": 2.5}, ALL, "not an integer"),
        ({"head_dim": 8}, ALL, "head dimension"),
    ],
)
def test_bad_targets_are_rejected_with_a_clear_message(target, modules, message):
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))
    with pytest.raises(ShapeError, match=message):
        target_shape(source, target, modules)


def test_kv_heads_follow_from_heads_when_left_out():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))  # 8 heads / 2 KV
    assert target_shape(source, {"n_heads": 4}, ALL).n_kv_heads == 1


def test_unsupported_model_type_is_rejected():
    with pytest.raises(ShapeError, match="unsupported model_type"):
        ModelShape.from_hf_config({"model_type": "gpt2"})


def test_gate_noise_is_a_function_of_seed_rank_step_and_forward():
    source = ModelShape.from_hf_config(tiny_config("llama_gqa"))

    def draws(seed, rank, steps):
        l0 = L0Module(source, {"n_layers": 2, "hidden_size": 32}, ["layer", "hidden"]).train()
        l0.noise_seed, l0.noise_rank = seed, rank
        out = []
        for step in steps:
            l0.train_step = step
            out.append(l0()[0]["hidden"])
        return out

    torch.manual_seed(123)  # the global RNG must not matter
    a = draws(17, 0, [5, 5, 6])
    torch.manual_seed(456)
    b = draws(17, 0, [5, 5, 6])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), "same (seed, rank, step, forward) → same noise"
    assert not torch.equal(a[0], a[1]), "two forwards of one step (microbatches) draw different noise"
    resumed = draws(17, 0, [6])
    assert torch.equal(resumed[0], a[2]), "a resumed run draws what the uninterrupted run drew"
    assert not torch.equal(draws(17, 1, [5])[0], a[0]) and not torch.equal(draws(18, 0, [5])[0], a[0])
