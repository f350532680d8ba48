"""Deterministic masks → a dense, stock Hugging Face model that computes the same logits.

The masked forward (`drpruning/pruning/prunable.py`) multiplies activations by mask values; a dense model can only
drop units. So pruned units (value 0) are removed and the values of kept units, which need not be 1, are
folded into the weights that produce or consume the masked activation:
- hidden h: embedding columns and every RMSNorm weight (the residual stream is h-scaled from the start),
  and the rows (and biases) of o_proj / down_proj, which write into the residual stream. The LM head reads
  the final norm, which already carries h, so its weight is only sliced (h is applied once there).
- layer: o_proj / down_proj rows and biases. head: o_proj input columns of the group's query heads.
  intermediate: down_proj input columns.
The names are Llama's; each family's own come from `drpruning/pruning/architectures.py`.
With tied embeddings and a non-1 hidden value the embedding cannot carry h for its input use and not for
its output use, so only then the LM head is written separately and `tie_word_embeddings` turned off.

`dense_export` is the whole in-memory step for an L0 module (kept units, dense model, summary, logit check),
shared by checkpoint export (`convert.py`) and one-shot pruning (`one_shot.py`). The kept units and the dense
shape are computed once (`kept_units`) and handed to every step that needs them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import PreTrainedModel

from drpruning.errors import ExportError
from drpruning.pruning.masks import L0Module
from drpruning.pruning.prunable import architecture_of, make_prunable, unit_modules
from drpruning.pruning.shapes import PRUNING_MODULES, ModelShape, mask_shapes

# The export check: max |Δlogits| ≤ VERIFY_ATOL + VERIFY_RTOL · max |logits|. The relative term is needed on
# real weights: fp32 itself is that noisy there (SmolLM2-135M, 30 layers, logits up to ~34: the masked fp32
# forward is 4e-4 away from a float64 one, the dense fp32 forward 2e-4), while a wrong fold or index gives
# errors of the order of the logits. Tiny test models meet VERIFY_ATOL alone by orders of magnitude.
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-4
VERIFY_SEQUENCE_LENGTH = 32


# ---- masks → kept units ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeptUnits:
    """Indices of the units a set of masks keeps; per-layer entries follow `layers` (source indices).

    `source` is the masked model's shape, `shape` the dense model's (embeddings untied where `prune_to_dense`
    must untie them)."""

    source: ModelShape
    shape: ModelShape
    layers: list[int]
    hidden: Tensor
    kv_heads: list[Tensor]
    intermediate: list[Tensor]

    def as_dict(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden.tolist(),
            "layers": [
                {"source_layer": layer, "kv_heads": heads.tolist(), "intermediate": units.tolist()}
                for layer, heads, units in zip(self.layers, self.kv_heads, self.intermediate, strict=True)
            ],
        }


def kept_units(shape: ModelShape, masks: Mapping[str, Tensor]) -> KeptUnits:
    """The kept indices and the dense model's shape, computed once per export; validates mask names and
    shapes, and that every kept layer keeps the same number of heads / units."""
    unknown = sorted(set(masks) - set(PRUNING_MODULES))
    if unknown:
        raise ExportError(f"unknown masks {unknown}; masks are named {list(PRUNING_MODULES)}")
    expected = mask_shapes(shape)
    for name, mask in masks.items():
        if tuple(mask.shape) != expected[name]:
            raise ExportError(f"{name} mask has shape {tuple(mask.shape)}; this model needs {expected[name]}")

    def kept(mask: Tensor | None, size: int) -> Tensor:
        return torch.arange(size) if mask is None else mask.detach().cpu().nonzero().flatten()

    layers = kept(masks.get("layer"), shape.n_layers).tolist()
    hidden = kept(masks.get("hidden"), shape.hidden_size)
    if not layers or not hidden.numel():
        raise ExportError(f"the masks keep {len(layers)} layers and {hidden.numel()} hidden dims; "
                          "a model needs at least one of each")  # fmt: skip
    head, intermediate = masks.get("head"), masks.get("intermediate")
    kv_heads = [kept(None if head is None else head[layer], shape.n_kv_heads) for layer in layers]
    units = [kept(None if intermediate is None else intermediate[layer], shape.intermediate_size) for layer in layers]
    for name, per_layer in (("head", kv_heads), ("intermediate", units)):
        counts = {layer: int(indices.numel()) for layer, indices in zip(layers, per_layer, strict=True)}
        if len(set(counts.values())) > 1 or 0 in counts.values():
            raise ExportError(
                f"the {name} mask keeps {counts} units in the kept layers ({{layer: count}}); a stock HF "
                "config needs the same non-zero count in every kept layer"
            )
    n_kv = int(kv_heads[0].numel())
    dense_shape = dataclasses.replace(
        shape,
        n_layers=len(layers),
        hidden_size=int(hidden.numel()),
        n_heads=n_kv * shape.heads_per_group,
        n_kv_heads=n_kv,
        intermediate_size=int(units[0].numel()),
        tie_embeddings=shape.tie_embeddings and bool((_values(masks.get("hidden"), hidden) == 1).all()),
    )
    return KeptUnits(source=shape, shape=dense_shape, layers=layers, hidden=hidden, kv_heads=kv_heads,
                     intermediate=units)  # fmt: skip


# ---- the dense model -----------------------------------------------------------------------------------


def prune_to_dense(
    model: PreTrainedModel, masks: Mapping[str, Tensor], kept: KeptUnits | None = None
) -> PreTrainedModel:
    """A new model of the same class and the smaller shape whose logits equal the masked forward's.

    `masks`: any subset of {layer [L], head [L, K], intermediate [L, F], hidden [d]}; 0 removes a unit,
    any other value is folded into the weights. `model` is read only (its hooks, if any, are ignored).
    `kept`: `kept_units` of these masks on this model, when the caller has them already.
    """
    if kept is None:
        kept = kept_units(ModelShape.from_hf_config(model.config), masks)
    shape = kept.source
    hidden_values = _values(masks.get("hidden"), kept.hidden)

    config = copy.deepcopy(model.config)
    config.update(kept.shape.hf_config_updates())
    if shape.tie_embeddings and not kept.shape.tie_embeddings:
        config.tie_word_embeddings = False

    with init_empty_weights(include_buffers=False):  # parameters come from the source, in its dtype
        dense = type(model)(config)
    dense.generation_config = copy.deepcopy(model.generation_config)

    source_decoder, dense_decoder = model.get_decoder(), dense.get_decoder()
    hid = kept.hidden
    embedding = model.get_input_embeddings().weight
    _assign(dense.get_input_embeddings(), "weight", _fold(embedding[:, hid], cols=hidden_values))
    _assign(dense_decoder.norm, "weight", _fold(source_decoder.norm.weight[hid], rows=hidden_values))
    if config.tie_word_embeddings:
        dense.tie_weights()
    else:
        _assign(dense.get_output_embeddings(), "weight", model.get_output_embeddings().weight[:, hid].clone())

    g, hd, arch = shape.heads_per_group, shape.head_dim, architecture_of(model)
    for new_index, (layer, kv, units) in enumerate(zip(kept.layers, kept.kv_heads, kept.intermediate, strict=True)):
        src, dst = source_decoder.layers[layer], dense_decoder.layers[new_index]
        out_scale = hidden_values * _value(masks.get("layer"), layer)
        query_heads = (kv[:, None] * g + torch.arange(g)).flatten()
        q_rows = _expand_heads(query_heads, hd)
        kv_rows = _expand_heads(kv, hd)
        head_cols = _values(None if "head" not in masks else masks["head"][layer], kv).repeat_interleave(g * hd)
        unit_cols = _values(None if "intermediate" not in masks else masks["intermediate"][layer], units)

        src_attention, src_mlp, src_out, src_ffn_out = unit_modules(arch, src)
        dst_attention, dst_mlp, dst_out, dst_ffn_out = unit_modules(arch, dst)
        for name, rows in zip(arch.query_key_value, (q_rows, kv_rows, kv_rows), strict=True):
            _copy_linear(getattr(src_attention, name), getattr(dst_attention, name), rows=rows, cols=hid)
        _copy_linear(src_out, dst_out, rows=hid, cols=q_rows, row_scale=out_scale, col_scale=head_cols)
        for name in arch.head_norms:  # over head_dim, shared by every head: unchanged
            _assign(getattr(dst_attention, name), "weight", getattr(src_attention, name).weight.detach().clone())
        for name in arch.ffn_in:
            _copy_linear(getattr(src_mlp, name), getattr(dst_mlp, name), rows=units, cols=hid)
        _copy_linear(src_ffn_out, dst_ffn_out, rows=hid, cols=units, row_scale=out_scale, col_scale=unit_cols)
        for name in arch.hidden_norms:
            _assign(getattr(dst, name), "weight", _fold(getattr(src, name).weight[hid], rows=hidden_values))

    left = [name for name, param in dense.named_parameters() if param.device.type == "meta"]
    if left:
        raise ExportError(f"{type(model).__name__} has parameters export does not handle: {left}")
    return dense.eval()


def _values(mask: Tensor | None, kept: Tensor) -> Tensor:
    """The float32 values of the kept units (1 where no mask is given)."""
    if mask is None:
        return torch.ones(kept.numel())
    return mask.detach().cpu().float()[kept]


def _value(mask: Tensor | None, index: int) -> float:
    return 1.0 if mask is None else float(mask[index])


def _expand_heads(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices of whole heads in a [heads · head_dim, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _fold(weight: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """Scale rows / columns in float32 and return a new tensor in the weight's dtype."""
    scaled = weight.detach().float()
    if rows is not None:
        scaled = scaled * (rows[:, None] if scaled.dim() == 2 else rows)
    if cols is not None:
        scaled = scaled * cols[None, :]
    return scaled.to(weight.dtype)


def _copy_linear(
    src: nn.Linear,
    dst: nn.Linear,
    rows: Tensor,
    cols: Tensor,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
) -> None:
    """dst = the (rows, cols) block of src, rows × row_scale (bias too), columns × col_scale."""
    weight = src.weight.detach().index_select(0, rows).index_select(1, cols)
    _assign(dst, "weight", _fold(weight, rows=row_scale, cols=col_scale))
    if src.bias is not None:
        _assign(dst, "bias", _fold(src.bias.detach()[rows], rows=row_scale))


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    current = module._parameters[name]
    if current is None or tuple(current.shape) != tuple(value.shape):
        raise ExportError(f"{type(module).__name__}.{name}: computed shape {tuple(value.shape)}, "
                          f"the dense model has {None if current is None else tuple(current.shape)}")  # fmt: skip
    module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=False)


# ---- verification, summary, the whole step -------------------------------------------------------------


@torch.no_grad()
def logit_difference(
    model: PreTrainedModel,
    masks: Mapping[str, Tensor],
    dense: PreTrainedModel,
    num_sequences: int = 4,
    seed: int = 0,
    *,
    shape: ModelShape | None = None,
) -> tuple[float, float]:
    """(max |Δlogits|, max |logits|) of the masked model (masks installed on `model`) vs `dense`, in fp32.

    `shape`: `model`'s shape, when the caller has it already."""
    if num_sequences < 1:
        raise ExportError(f"num_verify_sequences={num_sequences}; verification needs at least one sequence")
    if next(model.parameters()).dtype != torch.float32:
        model, dense = model.float(), dense.float()
    length = min(VERIFY_SEQUENCE_LENGTH, int(getattr(model.config, "max_position_embeddings", VERIFY_SEQUENCE_LENGTH)))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (num_sequences, length), generator=generator)
    state = make_prunable(model, shape if shape is not None else ModelShape.from_hf_config(model.config))
    state.set({name: mask.float() for name, mask in masks.items()})
    try:
        masked = model.eval()(ids, use_cache=False).logits
    finally:
        state.clear()
    return float((masked - dense.eval()(ids, use_cache=False).logits).abs().max()), float(masked.abs().max())


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def pruning_summary(
    model: PreTrainedModel,
    masks: Mapping[str, Tensor],
    dense: PreTrainedModel,
    *,
    source: str | None = None,
    step: int | None = None,
    target_shape: Mapping[str, int] | None = None,
    kept: KeptUnits | None = None,
) -> dict[str, Any]:
    """What was kept and how big the models are, written next to the export as `pruning.json`.

    `kept`: `kept_units` of these masks on `model` (the units `dense` was built from), when the caller has them."""
    if kept is None:
        kept = kept_units(ModelShape.from_hf_config(model.config), masks)
    return {
        "source": source,
        "step": step,
        "target_shape": dict(target_shape) if target_shape is not None else None,
        "source_shape": kept.source.target_dict(),
        "exported_shape": kept.shape.target_dict(),
        "params_before": num_parameters(model),
        "params_after": num_parameters(dense),
        "masks": sorted(masks),
        "untied_embeddings": kept.source.tie_embeddings and not dense.config.tie_word_embeddings,
        "soft_values_folded": any(bool(((m != 0) & (m != 1)).any()) for m in masks.values()),
        "kept": kept.as_dict(),
    }


def shared_with_current(l0_module: L0Module, masks: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per module: how much of the export is the model that trained at the end (the gates' current masks,
    which the last eval scored). `shared` is the fraction of the export's kept units the current masks also
    keep; 1.0 means no unit comes back that trained switched off."""
    current = l0_module.current_masks()
    result = {}
    for module, mask in masks.items():
        kept, now = mask > 0, current[module] > 0
        result[module] = {"export_units": int(kept.sum()), "current_units": int(now.sum()),
                          "shared": float((kept & now).sum() / kept.sum().clamp(min=1))}  # fmt: skip
    return result


def dense_export(
    model: PreTrainedModel,
    l0_module: L0Module,
    *,
    source: str | None,
    step: int | None,
    verify: bool = True,
    num_verify_sequences: int = 4,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The dense model of `l0_module.target_masks()` and its `pruning.json` summary, logits checked.

    Shared by checkpoint export (`convert.py`) and one-shot pruning (`one_shot.py`), so both keep units the same
    way, write the same summary and pass the same verification. `l0_module` was built for `model`, so its source
    shape is `model`'s: the kept units and both shapes are computed once, here."""
    masks = l0_module.target_masks()
    kept = kept_units(l0_module.source, masks)
    target = l0_module.target.target_dict()
    if kept.shape.target_dict() != target:
        raise ExportError(f"the masks give shape {kept.shape.target_dict()}, not the target {target}")
    dense = prune_to_dense(model, masks, kept)
    summary = pruning_summary(model, masks, dense, source=source, step=step, target_shape=target, kept=kept)
    summary["shared_with_current_masks"] = shared_with_current(l0_module, masks)
    if verify:
        difference, scale = logit_difference(model, masks, dense, num_verify_sequences, shape=kept.source)
        tolerance = VERIFY_ATOL + VERIFY_RTOL * scale
        if not difference <= tolerance:
            raise ExportError(f"verification failed: the export's logits differ from the masked model's by "
                              f"{difference:.3g} (> {tolerance:.3g}); nothing was written")  # fmt: skip
        summary["verification"] = {"max_abs_logit_diff": difference, "max_abs_logit": scale,
                                   "tolerance": tolerance, "sequences": num_verify_sequences}  # fmt: skip
    return dense, summary
