"""Deterministic masks → a dense, stock Hugging Face model that computes the same logits.

The masked forward (`drpruning/pruning/prunable.py`) multiplies activations by mask values; a dense model can only
drop units. So pruned units (value 0) are removed and the values of kept units, which need not be 1, are
folded into the weights that produce or consume the masked activation:
- hidden h: embedding columns and every RMSNorm weight (the residual stream is h-scaled from the start),
  and the rows (and biases) of o_proj / down_proj, which write into the residual stream. The LM head reads
  the final norm, which already carries h, so its weight is only sliced (h is applied once there).
- layer: o_proj / down_proj rows and biases. head: o_proj input columns of the group's query heads.
  intermediate: down_proj input columns.
With tied embeddings and a non-1 hidden value the embedding cannot carry h for its input use and not for
its output use, so only then the LM head is written separately and `tie_word_embeddings` turned off.

`export_run` does the whole job for a pruning run: read a Composer checkpoint (monolithic or sharded),
rebuild the source model and its `L0Module`, export, check the logits, and write a standard HF directory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from drpruning.errors import ConfigError, ExportError, ShapeError
from drpruning.pruning.masks import L0Module
from drpruning.pruning.prunable import make_prunable
from drpruning.pruning.shapes import PRUNING_MODULES, TARGET_KEYS, ModelShape
from drpruning.runs import MASKS_DIR, MASKS_META_FILE, PRUNING_STATE_KEY

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # ComposerHFCausalLM keeps the HF model as `.model`
L0_PREFIX = "l0_module."
GATES_PREFIX = L0_PREFIX + "gates."
# The export check: max |Δlogits| ≤ VERIFY_ATOL + VERIFY_RTOL · max |logits|. The relative term is needed on
# real weights: fp32 itself is that noisy there (SmolLM2-135M, 30 layers, logits up to ~34: the masked fp32
# forward is 4e-4 away from a float64 one, the dense fp32 forward 2e-4), while a wrong fold or index gives
# errors of the order of the logits. Tiny test models meet VERIFY_ATOL alone by orders of magnitude.
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-4
VERIFY_SEQUENCE_LENGTH = 32
_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")
_DCP_METADATA = ".metadata"
SUMMARY_FILE = "pruning.json"
# Every file `save_pretrained` of a causal LM and its tokenizer can write, plus the summary: what a previous
# export may hold. `--overwrite` replaces a folder only if it holds nothing else.
_EXPORT_FILE = re.compile(
    r"^(config\.json|generation_config\.json|pruning\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json))$"
)



# ---- masks → kept units ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeptUnits:
    """Indices of the units a set of masks keeps; per-layer entries follow `layers` (source indices)."""

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
    """Validate mask names and shapes, and that every kept layer keeps the same number of heads / units."""
    unknown = sorted(set(masks) - set(PRUNING_MODULES))
    if unknown:
        raise ExportError(f"unknown masks {unknown}; masks are named {list(PRUNING_MODULES)}")
    expected = {
        "layer": (shape.n_layers,),
        "head": (shape.n_layers, shape.n_kv_heads),
        "intermediate": (shape.n_layers, shape.intermediate_size),
        "hidden": (shape.hidden_size,),
    }
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
    return KeptUnits(layers=layers, hidden=hidden, kv_heads=kv_heads, intermediate=units)


# ---- the dense model -----------------------------------------------------------------------------------


def prune_to_dense(model: PreTrainedModel, masks: Mapping[str, Tensor]) -> PreTrainedModel:
    """A new model of the same class and the smaller shape whose logits equal the masked forward's.

    `masks`: any subset of {layer [L], head [L, K], intermediate [L, F], hidden [d]}; 0 removes a unit,
    any other value is folded into the weights. `model` is read only (its hooks, if any, are ignored).
    """
    shape = ModelShape.from_hf_config(model.config)
    kept = kept_units(shape, masks)
    hidden_values = _values(masks.get("hidden"), kept.hidden)
    untie = shape.tie_embeddings and not bool((hidden_values == 1).all())

    config = copy.deepcopy(model.config)
    n_kv = int(kept.kv_heads[0].numel())
    config.update(dataclasses.replace(
        shape,
        n_layers=len(kept.layers),
        hidden_size=int(kept.hidden.numel()),
        n_heads=n_kv * shape.heads_per_group,
        n_kv_heads=n_kv,
        intermediate_size=int(kept.intermediate[0].numel()),
    ).hf_config_updates())  # fmt: skip
    if untie:
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

    g, hd = shape.heads_per_group, shape.head_dim
    for new_index, (layer, kv, units) in enumerate(zip(kept.layers, kept.kv_heads, kept.intermediate, strict=True)):
        src, dst = source_decoder.layers[layer], dense_decoder.layers[new_index]
        out_scale = hidden_values * _value(masks.get("layer"), layer)
        query_heads = (kv[:, None] * g + torch.arange(g)).flatten()
        q_rows = _expand_heads(query_heads, hd)
        kv_rows = _expand_heads(kv, hd)
        head_cols = _values(None if "head" not in masks else masks["head"][layer], kv).repeat_interleave(g * hd)
        unit_cols = _values(None if "intermediate" not in masks else masks["intermediate"][layer], units)

        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            _copy_linear(getattr(src.self_attn, name), getattr(dst.self_attn, name), rows=rows, cols=hid)
        _copy_linear(src.self_attn.o_proj, dst.self_attn.o_proj, rows=hid, cols=q_rows,
                     row_scale=out_scale, col_scale=head_cols)  # fmt: skip
        for name in ("gate_proj", "up_proj"):
            _copy_linear(getattr(src.mlp, name), getattr(dst.mlp, name), rows=units, cols=hid)
        _copy_linear(src.mlp.down_proj, dst.mlp.down_proj, rows=hid, cols=units,
                     row_scale=out_scale, col_scale=unit_cols)  # fmt: skip
        for name in ("input_layernorm", "post_attention_layernorm"):
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


# ---- verification and summary --------------------------------------------------------------------------


@torch.no_grad()
def logit_difference(
    model: PreTrainedModel, masks: Mapping[str, Tensor], dense: PreTrainedModel, num_sequences: int = 4, seed: int = 0
) -> tuple[float, float]:
    """(max |Δlogits|, max |logits|) of the masked model (masks installed on `model`) vs `dense`, in fp32."""
    if num_sequences < 1:
        raise ExportError(f"num_verify_sequences={num_sequences}; verification needs at least one sequence")
    if next(model.parameters()).dtype != torch.float32:
        model, dense = model.float(), dense.float()
    length = min(VERIFY_SEQUENCE_LENGTH, int(getattr(model.config, "max_position_embeddings", VERIFY_SEQUENCE_LENGTH)))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (num_sequences, length), generator=generator)
    state = make_prunable(model, ModelShape.from_hf_config(model.config))
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
) -> dict[str, Any]:
    """What was kept and how big the models are, written next to the export as `pruning.json`."""
    shape = ModelShape.from_hf_config(model.config)
    return {
        "source": source,
        "step": step,
        "target_shape": dict(target_shape) if target_shape is not None else None,
        "source_shape": shape.target_dict(),
        "exported_shape": ModelShape.from_hf_config(dense.config).target_dict(),
        "params_before": num_parameters(model),
        "params_after": num_parameters(dense),
        "masks": sorted(masks),
        "untied_embeddings": shape.tie_embeddings and not dense.config.tie_word_embeddings,
        "soft_values_folded": any(bool(((m != 0) & (m != 1)).any()) for m in masks.values()),
        "kept": kept_units(shape, masks).as_dict(),
    }


# ---- reading a pruning run -------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint dir; a run folder gives its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if path.is_file() or (path / _DCP_METADATA).is_file():
        return path
    latest = path / "latest-rank0.pt"
    if latest.exists():
        return latest.resolve()
    candidates = [(int(m[1]), int(m[2]), child) for child in path.iterdir()
                  if (m := _CHECKPOINT_NAME.match(child.name)) and (m[3] or (child / _DCP_METADATA).is_file())]  # fmt: skip
    if not candidates:
        raise ExportError(f"{path} holds no Composer checkpoint (no latest-rank0.pt, ep*-ba*-rank0.pt or "
                          "sharded ep*-ba* folder)")  # fmt: skip
    return max(candidates)[2]


def _load_composer_state(checkpoint: Path) -> dict[str, Any]:
    """`state` of a Composer checkpoint (model, callbacks, timestamp, integrations), tensors memory-mapped."""
    if checkpoint.is_dir():
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        keys = {f"state.{key}" for key in ("model", "callbacks", "timestamp", "integrations")}
        try:
            loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(checkpoint))
        except Exception as error:  # noqa: BLE001 - any reader failure means an unreadable checkpoint
            raise ExportError(f"cannot read sharded checkpoint {checkpoint}: {error}") from error
    else:
        try:
            loaded = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:  # noqa: BLE001 - torch raises many types for truncated / foreign files
            raise ExportError(f"cannot read {checkpoint} as a Composer checkpoint (truncated, or not a "
                              f"torch.save file): {type(error).__name__}: {error}") from error  # fmt: skip
    state = loaded.get("state") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise ExportError(f"{checkpoint} is not a Composer checkpoint (no state['model'])")
    return state


def _pruning_description(state: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The `PruningCallback` state in the checkpoint, else `masks/meta.json` of the run folder."""
    saved = (state.get("callbacks") or {}).get(PRUNING_STATE_KEY)
    if isinstance(saved, Mapping) and "l0" in saved:
        return dict(saved)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        meta = folder / MASKS_DIR / MASKS_META_FILE
        if meta.is_file():
            return json.loads(meta.read_text(encoding="utf-8"))
    raise ExportError(f"{checkpoint} has no {PRUNING_STATE_KEY} state and no masks/meta.json next to it: "
                      "cannot tell the pruning target (was the `pruning` callback in the run?)")  # fmt: skip


def _hf_config_dict(description: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    if "hf_config" in description:
        return dict(description["hf_config"])
    try:
        return dict(state["integrations"]["huggingface"]["model"]["config"]["content"])
    except (KeyError, TypeError):
        raise ExportError("neither the pruning description nor the checkpoint holds the source HF config") from None


@dataclasses.dataclass
class PruningCheckpoint:
    """A pruning run's checkpoint, rebuilt: the source HF model, its L0 module, and where it came from."""

    path: Path
    model: PreTrainedModel
    l0_module: L0Module
    source: str | None
    step: int | None
    embedded_tokenizer: dict[str, Any] | None


def load_pruning_checkpoint(checkpoint_or_run_dir: str | Path) -> PruningCheckpoint:
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    state = _load_composer_state(checkpoint)
    model_state: Mapping[str, Tensor] = state["model"]
    if not any(key.startswith(GATES_PREFIX) for key in model_state):
        raise ExportError(
            f"{checkpoint} has no {GATES_PREFIX}* keys: it comes from a run without pruning masks. "
            "Continued-pretraining checkpoints are already dense and need no export (use hf_checkpointer)."
        )
    description = _pruning_description(state, checkpoint)
    l0_description = description["l0"]
    config_dict = _hf_config_dict(description, state)
    config = AutoConfig.for_model(**config_dict)
    shape = ModelShape.from_hf_config(config)
    if dataclasses.asdict(shape) != l0_description["source_shape"]:
        raise ExportError(f"the HF config's shape {dataclasses.asdict(shape)} differs from the pruning "
                          f"description's source shape {l0_description['source_shape']}")  # fmt: skip

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    hf_state = {k[len(MODEL_PREFIX):]: v for k, v in model_state.items() if k.startswith(MODEL_PREFIX)}
    try:
        model.load_state_dict(hf_state, strict=True, assign=True)
    except RuntimeError as error:
        raise ExportError(f"the weights in {checkpoint} do not fit the source config: {error}") from error
    if config.tie_word_embeddings:
        model.tie_weights()

    target = {key: l0_description["target_shape"][key] for key in TARGET_KEYS}
    try:
        l0_module = L0Module(shape, target=target, pruning_modules=l0_description["pruning_modules"])
    except ShapeError as error:
        raise ExportError(f"the pruning description in or next to {checkpoint} is not usable: {error}") from error
    l0_state = {k[len(L0_PREFIX):]: v for k, v in model_state.items() if k.startswith(L0_PREFIX)}
    try:
        l0_module.load_state_dict(l0_state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the l0_module in {checkpoint} does not fit its pruning description: {error}") from error

    timestamp = (state.get("timestamp") or {}).get("Timestamp") or {}
    tokenizer_state = ((state.get("integrations") or {}).get("huggingface") or {}).get("tokenizer")
    return PruningCheckpoint(
        path=checkpoint,
        model=model.eval(),
        l0_module=l0_module,
        source=description.get("source"),
        step=timestamp.get("batch"),
        embedded_tokenizer=tokenizer_state,
    )


# ---- writing the export ----------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, overwrite: bool, source: Path) -> None:
    """Refuse an OUT_DIR that would destroy something: the input (or a folder around or inside it), or,
    with `overwrite`, anything but a previous export (recognised by its pruning.json and export files only)."""
    out, source = out_dir.resolve(), source.resolve()
    if out == source or source in out.parents:
        where = "is" if out == source else "lies inside"
        raise ExportError(f"{out_dir} {where} the input {source}; write the export to a folder outside it")
    if out in source.parents:
        raise ExportError(f"{out_dir} contains the input {source}; write the export to a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if not (out_dir / SUMMARY_FILE).is_file():
        raise ExportError(f"{out_dir} is not a previous export (no {SUMMARY_FILE}); --overwrite replaces only an "
                          "export, so choose an empty or new folder")  # fmt: skip
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                     if p.is_dir() or not _EXPORT_FILE.match(p.name))  # fmt: skip
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"{out_dir} holds files an export does not write ({shown}); --overwrite replaces only a "
                          "previous export, so move them away or choose another folder")  # fmt: skip


def _save_tokenizer(out_dir: Path, override: str | Path | None, source: str | None,
                    embedded: Mapping[str, Any] | None) -> str:  # fmt: skip
    """Tokenizer files from the override, else the source model dir, else the copy inside the checkpoint."""
    for origin in (override, source):
        if origin is not None and (override is not None or Path(origin).is_dir()):
            AutoTokenizer.from_pretrained(str(origin)).save_pretrained(str(out_dir))
            return str(origin)
    if embedded:
        with tempfile.TemporaryDirectory() as files:
            for name, entry in embedded.items():
                content = entry["content"]
                target = Path(files) / Path(name).name
                if isinstance(content, bytes):
                    target.write_bytes(content)
                elif isinstance(content, str):
                    target.write_text(content, encoding="utf-8")
                else:
                    target.write_text(json.dumps(content), encoding="utf-8")
            AutoTokenizer.from_pretrained(files).save_pretrained(str(out_dir))
        return "checkpoint"
    raise ExportError("no tokenizer found: the source dir is missing and the checkpoint holds none; pass --tokenizer")


def export_run(
    checkpoint_or_run_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    num_verify_sequences: int = 4,
    tokenizer: str | Path | None = None,
) -> Path:
    """Export a pruning run's checkpoint to a standard HF directory; returns `out_dir`.

    Writes into a temporary sibling folder and renames it at the end, so a failure (including a failed
    logit check) leaves nothing that looks like a finished export.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, Path(checkpoint_or_run_dir))
    loaded = load_pruning_checkpoint(checkpoint_or_run_dir)
    dense, summary = dense_export(loaded.model, loaded.l0_module, source=loaded.source, step=loaded.step,
                                  verify=verify, num_verify_sequences=num_verify_sequences)  # fmt: skip
    summary["checkpoint"] = str(loaded.path)
    del loaded.model, loaded.l0_module  # the source is not needed for writing; free it before serialising
    gc.collect()
    return save_export(dense, summary, out_dir, overwrite=overwrite, tokenizer=tokenizer, source=loaded.source,
                       embedded_tokenizer=loaded.embedded_tokenizer, input_path=checkpoint_or_run_dir)  # fmt: skip


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

    Shared by checkpoint export and one-shot pruning (`drpruning/export/one_shot.py`), so both keep units the same
    way, write the same summary and pass the same verification."""
    masks = l0_module.target_masks()
    dense = prune_to_dense(model, masks)
    exported = ModelShape.from_hf_config(dense.config).target_dict()
    if exported != l0_module.target.target_dict():
        raise ExportError(f"the masks give shape {exported}, not the target {l0_module.target.target_dict()}")
    summary = pruning_summary(model, masks, dense, source=source, step=step,
                              target_shape=l0_module.target.target_dict())  # fmt: skip
    if verify:
        difference, scale = logit_difference(model, masks, dense, num_verify_sequences)
        tolerance = VERIFY_ATOL + VERIFY_RTOL * scale
        if not difference <= tolerance:
            raise ExportError(f"verification failed: the export's logits differ from the masked model's by "
                              f"{difference:.3g} (> {tolerance:.3g}); nothing was written")  # fmt: skip
        summary["verification"] = {"max_abs_logit_diff": difference, "max_abs_logit": scale,
                                   "tolerance": tolerance, "sequences": num_verify_sequences}  # fmt: skip
    return dense, summary


def save_export(
    dense: PreTrainedModel,
    summary: Mapping[str, Any],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    source: str | None = None,
    embedded_tokenizer: Mapping[str, Any] | None = None,
    input_path: str | Path,
) -> Path:
    """Write `dense`, its tokenizer and `pruning.json` to `out_dir` through a staging folder (all or nothing).

    `input_path` (the checkpoint, run folder or source model read) is never inside, around or equal to it."""
    out_dir, input_path = Path(out_dir), Path(input_path)
    _check_out_dir(out_dir, overwrite, input_path)
    summary = dict(summary)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        dense.save_pretrained(str(staging), safe_serialization=True)
        summary["tokenizer"] = _save_tokenizer(staging, tokenizer, source, embedded_tokenizer)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _replace_dir(staging, out_dir, overwrite, input_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(staging: Path, out_dir: Path, overwrite: bool, source: Path) -> None:
    _check_out_dir(out_dir, overwrite, source)  # re-check: the folder may have been filled while we worked
    if out_dir.is_dir() and any(out_dir.iterdir()):
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(retired / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        staging.rename(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a DRPruning run's masks as a dense Hugging Face model.")
    parser.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint file, or sharded dir")
    parser.add_argument("out_dir", help="output HF model directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT_DIR (a folder holding anything else is refused)")
    parser.add_argument("--no-verify", action="store_true", help="skip the masked-vs-dense logit check")
    parser.add_argument("--tokenizer", help="tokenizer dir to copy (default: the source model's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_run(args.checkpoint, args.out_dir, overwrite=args.overwrite, verify=not args.no_verify,
                         tokenizer=args.tokenizer)  # fmt: skip
    except (ExportError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = json.loads((out / "pruning.json").read_text(encoding="utf-8"))
    print(f"wrote {out}: {summary['params_before']:,} → {summary['params_after']:,} parameters, "
          f"shape {summary['exported_shape']}")  # fmt: skip
    return 0
