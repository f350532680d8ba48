"""Tiny random Llama / Qwen2 source models for tests and CPU recipes (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen2Config

TINY_KINDS = ("llama_mha", "llama_gqa", "qwen2")


def tiny_config(kind: str, vocab_size: int = 512, **overrides: Any) -> PretrainedConfig:
    """A 4-layer, d=64 decoder. `llama_gqa`: 8 heads / 2 KV groups; `qwen2`: q/k/v biases, tied embeddings."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    if kind == "llama_mha":
        config = LlamaConfig(**{**common, "num_key_value_heads": 8, "tie_word_embeddings": False, **overrides})
    elif kind == "llama_gqa":
        config = LlamaConfig(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": False, **overrides})
    elif kind == "qwen2":
        config = Qwen2Config(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                 "sliding_window": None, **overrides})
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS}")
    return config


def tiny_model(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny model; Qwen2 biases get random values so bias handling is exercised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def save_tiny_model(kind: str, out_dir: str | Path, vocab_size: int, seed: int = 0) -> Path:
    out = Path(out_dir)
    tiny_model(kind, seed=seed, vocab_size=vocab_size).save_pretrained(out)
    return out


def make_tiny_assets(out: str | Path, seq_len: int = 64) -> Path:
    """`tokenizer/`, `llama_gqa/`, `qwen2/` (HF dirs with the tokenizer), `corpus/`, `mds/` under `out`.

    Built in a sibling folder and renamed at the end, so a complete folder is never half-written.
    """
    from drpruning.tiny import make_tiny_mds

    out = Path(out)
    if (out / ".complete").exists():
        return out
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    make_tiny_mds(work, n_domains=4, seq_len=seq_len, eval_sequences=8, docs_per_domain=300)
    vocab_size = len(AutoTokenizer.from_pretrained(work / "tokenizer"))
    for kind in ("llama_gqa", "qwen2"):
        save_tiny_model(kind, work / kind, vocab_size=vocab_size)
        shutil.copytree(work / "tokenizer", work / kind, dirs_exist_ok=True)
    (work / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return out
