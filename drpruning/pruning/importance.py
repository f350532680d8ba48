"""Importance of every prunable unit from one calibration pass through the source model (no training).

Used two ways: to order the L0 gates before a pruning run (`l0_module.init: importance`, applied by the
`pruning` callback at Event.INIT) and to prune in one shot (`scripts/one_shot_prune.py`). Both go through
`L0Module.order_gates_`, so a run's target masks at step 0 ARE the one-shot model's kept units.

What is measured (forward only, on a few packed sequences; every sum in float64):
- `head` [L, K]: mean over tokens of ‖o_proj(x restricted to the KV group's query heads)‖², the squared
  norm of what the group writes into the residual stream. Removing a group removes exactly that term, so
  its size (not the raw attention output, whose scale o_proj may undo) is what pruning loses.
- `intermediate` [L, F]: E[a_j²]·‖W_down[:, j]‖² for a = act(gate)·up (the input of down_proj): the same
  quantity for one FFN unit, exact because down_proj is linear in each a_j.
- `hidden` [d]: Σ over every RMSNorm (two per layer and the final one) of E[out_c²], the energy that channel c
  carries into each block's input and the LM head, i.e. what the blocks read of it (norm weights included).
- `layer` [L], `layer_measure`:
  - `cosine` (default): E_tokens[1 − cos(h_in, h_out)] of each decoder block, ShortGPT's Block Influence.
    It comes from the same single pass; the drop-loss measure below costs L more passes.
  - `drop_loss`: mean LM loss with the block skipped (output := input) minus the full model's, L extra passes.
Sequences come from `drpruning/pruning/calibration.py`, seeded equal shares per domain, so a pass is a pure
function of (weights, data folder, settings): computed on rank 0 and broadcast, every rank orders its gates
the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from composer.utils import dist
from torch import Tensor, nn
from transformers import PreTrainedModel

from drpruning.errors import CalibrationError, UnsafeFileError
from drpruning.losses import next_token_losses
from drpruning.pruning.calibration import LAYER_MEASURES, CalibrationConfig, calibration_sequences
from drpruning.pruning.prunable import architecture_of, decoder_layers, mask_state_of, unit_modules
from drpruning.pruning.shapes import ModelShape
from drpruning.runs import IMPORTANCE_FILE, IMPORTANCE_SUMMARY_FILE
from drpruning.safe_load import load_torch_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FINGERPRINT_STRIDE = 997  # every 997th weight of each tensor: enough to tell two checkpoints apart, cheap



# ---- the pass -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Importance:
    """Per-unit importance (`scores`: name → float64 CPU tensor, the L0 gate shapes) and what it cost."""

    scores: dict[str, Tensor]
    layer_measure: str
    sequences: int
    tokens: int
    forward_passes: int
    seconds: float
    device: str
    peak_memory_bytes: int | None  # CUDA peak allocated during the pass; None on CPU (see benchmarks/)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def cost(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "device": self.device, "sequences": self.sequences,
                "tokens": self.tokens, "forward_passes": self.forward_passes,
                "peak_memory_bytes": self.peak_memory_bytes}  # fmt: skip

    def save(self, path: Path) -> None:
        payload = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(payload, partial)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> Importance:
        try:
            payload = load_torch_file(path, "an importance file")  # never runs code from the file
        except UnsafeFileError:
            raise
        except ValueError as error:
            raise CalibrationError(str(error)) from None
        if not isinstance(payload, dict) or payload.pop("format_version", None) != FORMAT_VERSION:
            raise CalibrationError(f"{path} is not an importance file of format {FORMAT_VERSION}")
        return cls(**payload)


class _Sums:
    """float64 accumulators on the pass's device, filled by forward hooks."""

    def __init__(self, shape: ModelShape, device: torch.device):
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64, device=device)  # noqa: E731
        self.head = zeros(shape.n_layers, shape.n_kv_heads)
        self.activation_sq = zeros(shape.n_layers, shape.intermediate_size)
        self.hidden = zeros(shape.hidden_size)
        self.block_change = zeros(shape.n_layers)
        self.tokens = 0


@contextmanager
def _hooks(model: PreTrainedModel, shape: ModelShape, sums: _Sums) -> Iterator[None]:
    group_width = shape.heads_per_group * shape.head_dim
    handles = []

    def head_hook(index: int, attention_out: nn.Linear) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].flatten(0, -2).float()
            weight = attention_out.weight.float()
            for group in range(shape.n_kv_heads):
                cols = slice(group * group_width, (group + 1) * group_width)
                sums.head[index, group] += (x[:, cols] @ weight[:, cols].T).double().pow(2).sum()

        return hook

    def unit_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sums.activation_sq[index] += args[0].flatten(0, -2).double().pow(2).sum(0)

        return hook

    def norm_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        sums.hidden += output.flatten(0, -2).double().pow(2).sum(0)

    def block_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Any) -> None:
            h_in, h_out = args[0].flatten(0, -2).double(), output[0].flatten(0, -2).double()
            sums.block_change[index] += (1.0 - F.cosine_similarity(h_in, h_out, dim=-1)).sum()

        return hook

    decoder, arch = model.get_decoder(), architecture_of(model)
    try:
        handles.append(decoder.norm.register_forward_hook(norm_hook))
        for index, layer in enumerate(decoder_layers(model)):
            _, _, attention_out, ffn_out = unit_modules(arch, layer)
            handles.append(attention_out.register_forward_pre_hook(head_hook(index, attention_out)))
            handles.append(ffn_out.register_forward_pre_hook(unit_hook(index)))
            for name in arch.hidden_norms:
                handles.append(getattr(layer, name).register_forward_hook(norm_hook))
            handles.append(layer.register_forward_hook(block_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _skipped(layer: nn.Module) -> Iterator[None]:
    """The decoder block returns its input unchanged (the model without that layer)."""
    handle = layer.register_forward_hook(lambda module, args, output: (args[0], *output[1:]))
    try:
        yield
    finally:
        handle.remove()


def _loss_sum(model: PreTrainedModel, batch: Tensor) -> float:
    token_loss, _ = next_token_losses(model(input_ids=batch, use_cache=False).logits, batch)
    return float(token_loss.sum())


@contextmanager
def _calibration_mode(model: PreTrainedModel, device: torch.device) -> Iterator[None]:
    """eval mode, masks off (a prunable model computes the stock forward), on `device`; all restored after."""
    masks = mask_state_of(model)
    original = next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    try:
        with masks.off() if masks is not None else nullcontext():
            yield
    finally:
        model.to(original).train(was_training)


def pass_device(model: PreTrainedModel, requested: str | None = None) -> torch.device:
    """`requested`, else the model's device, else CUDA when there is one (the model is moved for the pass)."""
    if requested is not None:
        return torch.device(requested)
    current = next(model.parameters()).device
    if current.type != "cpu":
        return current
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else current


@torch.no_grad()
def compute_importance(
    model: PreTrainedModel,
    sequences: Tensor,
    *,
    batch_size: int = 4,
    layer_measure: str = "cosine",
    device: str | torch.device | None = None,
) -> Importance:
    """Score every unit of `model` (a stock or prunable HF Llama/Qwen2) on `sequences` [N, S]."""
    if layer_measure not in LAYER_MEASURES:
        raise CalibrationError(f"layer_measure={layer_measure!r} must be one of {', '.join(LAYER_MEASURES)}")
    if any(p.is_meta for p in model.parameters()):
        raise CalibrationError("the model has meta (not loaded) weights: run the calibration where they are loaded")
    if sequences.ndim != 2 or sequences.shape[1] < 2 or not len(sequences):
        raise CalibrationError(f"calibration sequences must be [N ≥ 1, S ≥ 2] token ids, got {tuple(sequences.shape)}")
    shape = ModelShape.from_hf_config(model.config)
    target = pass_device(model, None if device is None else str(device))
    cuda = target.type == "cuda"
    if cuda:
        torch.cuda.synchronize(target)
        torch.cuda.reset_peak_memory_stats(target)
    start = time.perf_counter()
    sums = _Sums(shape, target)
    batches = [sequences[i:i + batch_size].to(target) for i in range(0, len(sequences), batch_size)]
    passes = 1
    with _calibration_mode(model, target):
        with _hooks(model, shape, sums):
            full_loss = sum(_loss_sum(model, batch) for batch in batches)
        tokens = sequences.numel()
        predicted = sequences.shape[0] * (sequences.shape[1] - 1)
        if layer_measure == "cosine":
            layer = sums.block_change / tokens
        else:
            drops = []
            for block in decoder_layers(model):
                with _skipped(block):
                    drops.append(sum(_loss_sum(model, batch) for batch in batches))
            passes += shape.n_layers
            layer = (torch.tensor(drops, dtype=torch.float64) - full_loss) / predicted
        arch = architecture_of(model)
        down_norms = torch.stack([
            unit_modules(arch, block)[3].weight.detach().double().pow(2).sum(0) for block in decoder_layers(model)
        ])  # fmt: skip
        scores = {
            "layer": layer,
            "head": sums.head / tokens,
            "intermediate": sums.activation_sq / tokens * down_norms,
            "hidden": sums.hidden / tokens,
        }
        scores = {name: value.detach().to("cpu", torch.float64) for name, value in scores.items()}
    if cuda:
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - start
    bad = [name for name, value in scores.items() if not torch.isfinite(value).all()]
    if bad:
        raise CalibrationError(f"the calibration pass produced non-finite importance for {bad} "
                               "(does the source model produce finite logits?)")  # fmt: skip
    return Importance(
        scores=scores, layer_measure=layer_measure, sequences=len(sequences), tokens=tokens,
        forward_passes=passes, seconds=seconds, device=str(target),
        peak_memory_bytes=torch.cuda.max_memory_allocated(target) if cuda else None,
    )  # fmt: skip


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of a strided sample of every named parameter: tells whether a cached pass saw these weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        sample = param.detach().flatten()[::_FINGERPRINT_STRIDE].float().cpu().numpy()
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def calibrate(model: PreTrainedModel, config: CalibrationConfig, source: str | None = None) -> Importance:
    """Read the calibration sequences and score `model` on them; `meta` says what was measured."""
    sequences, counts = calibration_sequences(config)
    importance = compute_importance(model, sequences, batch_size=config.batch_size,
                                    layer_measure=config.layer_measure, device=config.device)  # fmt: skip
    importance.meta = {
        "calibration": config.describe(),
        "sequences_per_domain": counts,
        "sequence_length": int(sequences.shape[1]),
        "source": source,
        "source_shape": dataclasses.asdict(ModelShape.from_hf_config(model.config)),
        "weights": weights_fingerprint(model),
    }
    log.info("importance: %d sequences × %d tokens, %d forward pass(es) on %s in %.1f s",
             len(sequences), sequences.shape[1], importance.forward_passes, importance.device, importance.seconds)
    return importance


# ---- in a training run ----------------------------------------------------------------------------------


def importance_for_run(model: PreTrainedModel, config: CalibrationConfig, folder: Path,
                       source: str | None = None) -> Importance:  # fmt: skip
    """The run's importance: computed on global rank 0 (the only rank with weights under `init_device: mixed`)
    and broadcast, so every rank orders its gates identically.

    Rank 0 reuses `<folder>/importance.pt` (written by `write_importance`) when
    the settings, the source and its weights match, so a resumed run does not pass over the data again
    (the checkpoint's gates then replace the ordered ones anyway). Any failure reaches every rank as the
    same error, instead of the other ranks waiting forever on the broadcast.
    """
    payload: list[Any] = [None]
    if dist.get_global_rank() == 0:
        try:
            payload[0] = _rank_zero_importance(model, config, folder, source)
        except Exception as error:  # noqa: BLE001 - re-raised below on every rank
            payload[0] = f"{type(error).__name__}: {error}"
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise CalibrationError(f"importance calibration failed on rank 0: {payload[0]}")
    return payload[0]


def _rank_zero_importance(model: PreTrainedModel, config: CalibrationConfig, folder: Path,
                          source: str | None) -> Importance:  # fmt: skip
    path = folder / IMPORTANCE_FILE
    expected = {
        "calibration": config.describe(),
        "source": source,
        "source_shape": dataclasses.asdict(ModelShape.from_hf_config(model.config)),
        "weights": weights_fingerprint(model),
    }
    if path.is_file():
        try:
            cached = Importance.load(path)
        except Exception as error:  # noqa: BLE001 - an unreadable cache is recomputed, not fatal
            log.warning("importance: ignoring unreadable %s (%s)", path, error)
        else:
            if all(cached.meta.get(key) == value for key, value in expected.items()):
                log.info("importance: reusing %s (same source, weights and calibration settings)", path)
                return cached
            log.info("importance: %s was computed for other settings or weights; recomputing", path)
    return calibrate(model, config, source)


def write_importance(importance: Importance, folder: Path) -> None:
    """Keep `importance` in the run folder (`importance.pt` for resumes, `importance.json` to read).

    Called by the `pruning` callback at FIT_START, after the run folder has been cleared of an earlier run."""
    importance.save(folder / IMPORTANCE_FILE)
    summary = {"meta": importance.meta, "cost": importance.cost(), "layer_measure": importance.layer_measure,
               "layer": importance.scores["layer"].tolist()}  # fmt: skip
    (folder / IMPORTANCE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
