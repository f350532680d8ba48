"""The masked forward: open gates change nothing, and deterministic masks ARE the smaller model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpruning.demo.tiny import tiny_model
from drpruning.pruning.prunable import make_prunable
from drpruning.pruning.shapes import ModelShape

CASES = [
    ("llama_mha", {}),
    ("llama_gqa", {}),
    ("llama_gqa", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("mistral", {}),
    ("qwen3", {}),
    ("qwen3", {"attention_bias": True, "tie_word_embeddings": False}),
]


def _ids(vocab: int = 512, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,overrides", CASES)
def test_open_gates_equal_stock_model(kind, overrides):
    stock = tiny_model(kind, **overrides)
    masked = copy.deepcopy(stock)
    shape = ModelShape.from_hf_config(masked.config)
    state = make_prunable(masked, shape)
    ids = _ids()
    expected = stock(ids).logits
    assert torch.equal(masked(ids).logits, expected), "no masks set must be exactly the stock forward"
    state.set({
        "layer": torch.ones(shape.n_layers),
        "head": torch.ones(shape.n_layers, shape.n_kv_heads),
        "intermediate": torch.ones(shape.n_layers, shape.intermediate_size),
        "hidden": torch.ones(shape.hidden_size),
    })
    assert (masked(ids).logits - expected).abs().max() <= 1e-5


def _random_masks(shape: ModelShape, keep: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def pick(rows: int, n: int, k: int) -> torch.Tensor:
        mask = torch.zeros(rows, n)
        for r in range(rows):
            mask[r, torch.randperm(n, generator=g)[:k]] = 1.0
        return mask

    return {
        "layer": pick(1, shape.n_layers, keep["layer"])[0],
        "head": pick(shape.n_layers, shape.n_kv_heads, keep["head"]),
        "intermediate": pick(shape.n_layers, shape.intermediate_size, keep["intermediate"]),
        "hidden": pick(1, shape.hidden_size, keep["hidden"])[0],
    }


def _slice_by_hand(model, masks: dict[str, torch.Tensor], shape: ModelShape):
    """Build the smaller stock model and copy the kept weights (written independently of export.py)."""
    hid = masks["hidden"].nonzero().flatten()
    layers = masks["layer"].nonzero().flatten().tolist()
    kv_keep = [masks["head"][layer].nonzero().flatten() for layer in layers]
    g, hd = shape.heads_per_group, shape.head_dim
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    config.hidden_size = len(hid)
    config.num_key_value_heads = len(kv_keep[0])
    config.num_attention_heads = len(kv_keep[0]) * g
    config.intermediate_size = int(masks["intermediate"][0].sum())
    config.head_dim = hd
    small = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    src_dec, dst_dec = model.get_decoder(), small.get_decoder()
    with torch.no_grad():
        dst_dec.embed_tokens.weight.copy_(src_dec.embed_tokens.weight[:, hid])
        dst_dec.norm.weight.copy_(src_dec.norm.weight[hid])
        if not config.tie_word_embeddings:
            small.lm_head.weight.copy_(model.lm_head.weight[:, hid])
        for new, old in enumerate(layers):
            s, d = src_dec.layers[old], dst_dec.layers[new]
            kv = kv_keep[new]
            q_rows = torch.cat([torch.arange(k * g * hd, (k + 1) * g * hd) for k in kv.tolist()])
            kv_rows = torch.cat([torch.arange(k * hd, (k + 1) * hd) for k in kv.tolist()])
            ffn = masks["intermediate"][old].nonzero().flatten()
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                getattr(d.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight[rows][:, hid])
                if getattr(s.self_attn, name).bias is not None:
                    getattr(d.self_attn, name).bias.copy_(getattr(s.self_attn, name).bias[rows])
            d.self_attn.o_proj.weight.copy_(s.self_attn.o_proj.weight[hid][:, q_rows])
            for name in ("q_norm", "k_norm"):  # Qwen3: over head_dim, shared by the heads
                if hasattr(s.self_attn, name):
                    getattr(d.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight)
            if s.self_attn.o_proj.bias is not None:
                d.self_attn.o_proj.bias.copy_(s.self_attn.o_proj.bias[hid])
            for name in ("gate_proj", "up_proj"):
                getattr(d.mlp, name).weight.copy_(getattr(s.mlp, name).weight[ffn][:, hid])
                if getattr(s.mlp, name).bias is not None:
                    getattr(d.mlp, name).bias.copy_(getattr(s.mlp, name).bias[ffn])
            d.mlp.down_proj.weight.copy_(s.mlp.down_proj.weight[hid][:, ffn])
            if s.mlp.down_proj.bias is not None:
                d.mlp.down_proj.bias.copy_(s.mlp.down_proj.bias[hid])
            d.input_layernorm.weight.copy_(s.input_layernorm.weight[hid])
            d.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight[hid])
    return small


@pytest.mark.parametrize("kind,overrides", CASES)
def test_deterministic_masks_equal_hand_sliced_model(kind, overrides):
    model = tiny_model(kind, **overrides)
    shape = ModelShape.from_hf_config(model.config)
    keep = {"layer": 3, "head": shape.n_kv_heads // 2, "intermediate": 80, "hidden": 40}
    masks = _random_masks(shape, keep)
    small = _slice_by_hand(model, masks, shape)
    make_prunable(model, shape).set(masks)
    ids = _ids()
    diff = (model(ids).logits - small(ids).logits).abs().max()
    assert diff <= 1e-4, f"masked model differs from the hand-pruned model by {diff}"
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_hooks_follow_mask_changes_without_reinstall():
    model = tiny_model("llama_gqa")
    shape = ModelShape.from_hf_config(model.config)
    state = make_prunable(model, shape)
    assert make_prunable(model, shape) is state, "installing twice must not stack hooks"
    ids = _ids()
    open_logits = model(ids).logits
    state.set({"intermediate": torch.zeros(shape.n_layers, shape.intermediate_size)})
    closed = model(ids).logits
    state.clear()
    assert not torch.allclose(open_logits, closed)
    assert torch.equal(model(ids).logits, open_logits)
