"""One table per decoder family: which weights each prunable unit owns.

Masking (`prunable.py`), importance (`importance.py`), export (`export/dense.py`) and the parameter count
(`shapes.py`) read this table and nothing else about a family, so supporting another Llama-like decoder is
one entry here. The roles, for a decoder layer `L` (names relative to `L`, then to its attention or MLP):

- `query_key_value` (in `attention`): rows are heads × head_dim, columns the hidden dims. A KV group owns
  its key and value heads and the query heads that share them.
- `attention_out`: columns are query heads × head_dim (the head mask scales its input), rows write the
  residual stream (hidden and layer masks scale its output).
- `ffn_in` (in `mlp`): rows are FFN units, columns hidden dims. `ffn_out`: columns are FFN units (the
  intermediate mask scales its input), rows write the residual stream.
- `hidden_norms`: RMSNorms over the hidden dims (with the decoder's final `norm`): masked and folded.
- `head_norms` (in `attention`): norms over head_dim shared by every head (Qwen3's q_norm / k_norm), kept
  as they are: pruning heads or hidden dims does not change head_dim.
- Biases: `True` / `False`, or the config key that switches them on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from drpruning.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    attention: str = "self_attn"
    query_key_value: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    attention_out: str = "o_proj"
    mlp: str = "mlp"
    ffn_in: tuple[str, ...] = ("gate_proj", "up_proj")
    ffn_out: str = "down_proj"
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()
    qkv_bias: bool | str = False
    out_bias: bool | str = False
    mlp_bias: bool | str = False

    def has_bias(self, role: str, get: Callable[[str, Any], Any]) -> bool:
        """Whether `role` ("qkv", "out" or "mlp") has biases in a model whose config `get` reads."""
        rule = {"qkv": self.qkv_bias, "out": self.out_bias, "mlp": self.mlp_bias}[role]
        return bool(get(rule, False)) if isinstance(rule, str) else rule


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias"),
        Architecture("mistral"),
        Architecture("qwen2", qkv_bias=True),
        Architecture("qwen3", qkv_bias="attention_bias", out_bias="attention_bias", head_norms=("q_norm", "k_norm")),
    )
}


def architecture(model_type: str | None) -> Architecture:
    """The table entry of a Hugging Face `model_type`; a clear error for a family drpruning does not prune."""
    if model_type not in ARCHITECTURES:
        raise ShapeError(f"unsupported model_type {model_type!r}: drpruning prunes {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
