"""Masked forward for stock Hugging Face decoders of the families in `architectures.py`.

Instead of re-implementing the decoder, masks enter through forward hooks on the HF modules and a
masked RMSNorm swapped in place, so parameter names, attention kernels (SDPA, flash), RoPE and the
softmax scale are exactly HF's. With deterministic masks the masked model IS the pruned model:
- embeddings × hidden; each RMSNorm normalises over the kept dims only and multiplies by hidden;
- attention output per query head (input of o_proj) × head (a KV group's mask, for each of its heads);
- o_proj output × layer × hidden; FFN act(gate)·up (input of down_proj) × intermediate;
- down_proj output × layer × hidden.
The LM head reads the final norm's output, which is already × hidden, so hidden is applied once there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from drpruning.pruning.architectures import Architecture, architecture
from drpruning.pruning.shapes import ModelShape


class MaskedRMSNorm(nn.Module):
    """Llama/Qwen2 RMSNorm whose mean square runs over the kept hidden dims only.

    Instances of the HF norm classes get this class swapped in, so `weight` and `variance_epsilon`
    (and the state-dict names) are untouched. Without a hidden mask it computes exactly HF's maths.
    """

    weight: nn.Parameter
    variance_epsilon: float
    hidden_masks: MaskState

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        hidden = self.hidden_masks.hidden
        if hidden is None:
            variance = x.pow(2).mean(-1, keepdim=True)
        else:
            # Pruned dims of the residual stream are exactly 0, so the sum runs over the kept ones.
            variance = x.pow(2).sum(-1, keepdim=True) / self.hidden_masks.n_hidden_kept
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        out = self.weight * x.to(input_dtype)
        return out if hidden is None else out * hidden.to(out.dtype)


MASK_STATE_ATTRIBUTE = "_drpruning_masks"  # where make_prunable leaves a model's MaskState


def mask_state_of(model: nn.Module) -> MaskState | None:
    """The `MaskState` that `make_prunable` installed on `model`, or None for a stock model."""
    return getattr(model, MASK_STATE_ATTRIBUTE, None)


class MaskState:
    """The masks of the current forward, as the hooks need them (per-layer vectors, precomputed once)."""

    def __init__(self, shape: ModelShape):
        self.shape = shape
        self.clear()

    def clear(self) -> None:
        self.hidden: Tensor | None = None
        self.n_hidden_kept: Tensor | None = None
        self.query_heads: Tensor | None = None  # [L, H]
        self.intermediate: Tensor | None = None  # [L, F]
        self.output_scale: Tensor | None = None  # [L, d] or [L, 1]

    @contextmanager
    def off(self) -> Iterator[None]:
        """Masks cleared inside (the model computes the stock forward), the current ones restored after."""
        saved = dict(vars(self))
        self.clear()
        try:
            yield
        finally:
            vars(self).update(saved)

    def set(self, masks: Mapping[str, Tensor]) -> None:
        """Take masks {layer [L], head [L, K], intermediate [L, F], hidden [d]}; missing ones mean 'keep all'."""
        self.clear()
        hidden, layer = masks.get("hidden"), masks.get("layer")
        if hidden is not None:
            self.hidden = hidden
            self.n_hidden_kept = (hidden != 0).sum().clamp(min=1)
        if "head" in masks:
            self.query_heads = masks["head"].repeat_interleave(self.shape.heads_per_group, dim=-1)
        self.intermediate = masks.get("intermediate")
        if layer is not None and hidden is not None:
            self.output_scale = layer[:, None] * hidden[None, :]
        elif layer is not None:
            self.output_scale = layer[:, None]
        elif hidden is not None:
            self.output_scale = hidden[None, :].expand(self.shape.n_layers, -1)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_decoder().layers


def architecture_of(model: PreTrainedModel) -> Architecture:
    return architecture(getattr(model.config, "model_type", None))


def unit_modules(arch: Architecture, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear, nn.Linear]:
    """(attention, MLP, attention output projection, FFN output projection) of one decoder layer."""
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    return attention, mlp, getattr(attention, arch.attention_out), getattr(mlp, arch.ffn_out)


def make_prunable(model: PreTrainedModel, shape: ModelShape) -> MaskState:
    """Install the masked forward on `model` in place and return the `MaskState` that drives it.

    With no masks set (`state.clear()`), the model computes exactly what the stock HF model computes.
    """
    if (existing := mask_state_of(model)) is not None:
        return existing
    state = MaskState(shape)
    arch = architecture_of(model)
    decoder = model.get_decoder()
    model.get_input_embeddings().register_forward_hook(_scale_output(lambda: state.hidden))
    norms = [decoder.norm]
    for index, layer in enumerate(decoder_layers(model)):
        norms += [getattr(layer, name) for name in arch.hidden_norms]
        _, _, attention_out, ffn_out = unit_modules(arch, layer)
        attention_out.register_forward_pre_hook(_mask_heads(state, index, shape.n_heads, shape.head_dim))
        attention_out.register_forward_hook(_scale_output(lambda i=index: _row(state.output_scale, i)))
        ffn_out.register_forward_pre_hook(_scale_input(lambda i=index: _row(state.intermediate, i)))
        ffn_out.register_forward_hook(_scale_output(lambda i=index: _row(state.output_scale, i)))
    for norm in norms:
        norm.__class__ = MaskedRMSNorm
        norm.hidden_masks = state
    setattr(model, MASK_STATE_ATTRIBUTE, state)
    return state


def _row(values: Tensor | None, index: int) -> Tensor | None:
    return None if values is None else values[index]


def _scale_output(get_scale):
    def hook(module: nn.Module, args, output: Tensor) -> Tensor | None:
        scale = get_scale()
        return None if scale is None else output * scale.to(output.dtype)

    return hook


def _scale_input(get_scale):
    def hook(module: nn.Module, args) -> tuple[Tensor] | None:
        scale = get_scale()
        return None if scale is None else (args[0] * scale.to(args[0].dtype),)

    return hook


def _mask_heads(state: MaskState, index: int, n_heads: int, head_dim: int):
    def hook(module: nn.Module, args) -> tuple[Tensor] | None:
        if state.query_heads is None:
            return None
        x = args[0]
        heads = x.unflatten(-1, (n_heads, head_dim)) * state.query_heads[index].to(x.dtype)[:, None]
        return (heads.flatten(-2),)

    return hook
