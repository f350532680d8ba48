"""The Composer model: loss equals HF's, per-domain statistics, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpruning.errors import ConfigError, ShapeError
from drpruning.pruning.callback import PruningCallback
from drpruning.pruning.model import DomainStats, DRPruningCausalLM, batches, l0_module_options

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}


def _model(assets, **kwargs) -> DRPruningCausalLM:
    source = assets / "llama_gqa"
    return DRPruningCausalLM(tokenizer=AutoTokenizer.from_pretrained(source),
                             pretrained_model_name_or_path=str(source), **kwargs)


def _batch(vocab=512, domains=(0, 2, 2, 1)):
    ids = torch.randint(0, vocab, (len(domains), 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "domain": torch.tensor(domains)}


def test_loss_equals_hf_loss_and_domain_sums_match_by_hand(tiny_assets):
    model = _model(tiny_assets).eval()
    batch = _batch()
    loss = model.loss(model(batch), batch)
    hf = AutoModelForCausalLM.from_pretrained(tiny_assets / "llama_gqa").eval()
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        logits = hf(input_ids=batch["input_ids"]).logits
    assert torch.allclose(loss["total"], expected, atol=1e-5)
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
    per_sequence = per_token.view(4, 15).sum(-1).double()
    loss_sum, tokens = model.domain_stats.take(4)
    assert torch.allclose(loss_sum, torch.stack([per_sequence[0], per_sequence[3], per_sequence[1] + per_sequence[2],
                                                 torch.zeros((), dtype=torch.float64)]), atol=1e-6)
    assert tokens.tolist() == [15.0, 15.0, 30.0, 0.0]
    assert model.domain_stats.take(4)[1].sum() == 0, "take resets"
    assert model.pruning_stats() is None


def test_domain_ids_beyond_the_mixer_are_an_error():
    stats = DomainStats()
    stats.add(torch.tensor([0, 5]), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"domain ids \[5\]"):
        stats.take(3)


def test_pruning_model_reports_stats_and_needs_its_callback(tiny_assets):
    model = _model(tiny_assets, l0_module={"target": TARGET}).train()
    batch = _batch()
    with pytest.raises(RuntimeError, match="pruning"):
        model(batch)
    model.l0_module.train_step = 3
    losses = model.loss(model(batch), batch)
    assert set(losses) == {"total", "lm_loss", "lagrangian_loss"}, "the loss dict holds only losses"
    stats = model.pruning_stats()
    assert {"expected_sparsity/head", "target_sparsity/layer", "lambda_1/hidden", "lambda_2/intermediate"} <= set(stats)
    assert stats["target_params"] < stats["expected_params"] <= stats["source_params"]
    with torch.no_grad():
        model.l0_module.lambda_1["hidden"].add_(1.0)  # as the optimizer step after the forward does
    assert model.pruning_stats()["lambda_1/hidden"] == stats["lambda_1/hidden"], "the forward's values, kept"


@pytest.mark.parametrize("block,message", [
    ({"target": TARGET, "warmup": 3}, "unknown l0_module keys"),
    ({"pruning_modules": ["layer"]}, "needs a `target`"),
])
def test_bad_l0_module_blocks_are_rejected(tiny_assets, block, message):
    with pytest.raises(ValueError, match=message):
        _model(tiny_assets, l0_module=block)


def test_resuming_toward_a_different_target_is_refused():
    callback = PruningCallback()
    callback.metadata = {"l0": {"target_shape": {"n_layers": 3}}}
    with pytest.raises(ValueError, match="pruned toward"):
        callback.load_state_dict({"l0": {"target_shape": {"n_layers": 2}}})


def test_first_eval_of_a_pruning_run_scores_the_current_model_not_the_target(tiny_assets):
    """Fresh gates expect (almost) every unit: `eval_masks: current` (default) scores the source model,
    `target` scores a model of the final shape chosen by untrained gates (SPEC §3)."""
    batch = _batch()
    source = _model(tiny_assets).eval()
    with torch.no_grad():
        source_logits = source(batch).logits
    current = _model(tiny_assets, l0_module={"target": TARGET}).eval()
    target = _model(tiny_assets, l0_module={"target": TARGET, "eval_masks": "target"}).eval()
    with torch.no_grad():
        current_logits, target_logits = current(batch).logits, target(batch).logits
    # P(z > 0) = 0.998 at the start: every tiny row keeps all its units, so the logits are the source's.
    assert torch.allclose(current_logits, source_logits, atol=1e-5)
    assert (target_logits - source_logits).abs().max() > 0.1
    kept = current.l0_module.mean_kept_per_row(current.last_eval_masks)
    assert kept == {"layer": 4.0, "head": 2.0, "intermediate": 128.0, "hidden": 64.0}
    assert current.l0_module.mean_kept_per_row(current.l0_module.last_target_masks)["layer"] == TARGET["n_layers"]


@pytest.mark.parametrize("value, expected", [(640, 640), ("640ba", 640), ("0ba", 0), (0, 0)])
def test_durations_are_read_as_batches(value, expected):
    assert batches(value, "lagrangian_warmup") == expected
    options, _ = l0_module_options({"target": {"n_layers": 1}, "lagrangian_warmup": value})
    assert options["lagrangian_warmup"] == expected


@pytest.mark.parametrize("value", ["2ep", "100tok", "soon", -1, True, 1.5])
def test_durations_in_other_units_or_negative_are_refused_by_name(value):
    with pytest.raises(ShapeError, match=r"lagrangian_warmup=.* must be a non-negative number of batches"):
        l0_module_options({"target": {"n_layers": 1}, "lagrangian_warmup": value})


def test_l0_module_block_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown l0_module keys \['warmup'\]"):
        l0_module_options({"target": {"n_layers": 1}, "warmup": 3})
    with pytest.raises(ConfigError, match="needs a `target`"):
        l0_module_options({"lagrangian_warmup": 3})
