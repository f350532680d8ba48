"""How the L0 module trains beside a data-parallel or sharded model.

`L0Module` is kept out of FSDP (`_fsdp_wrap = False`) so its maths stays fp32 under bf16 mixed precision.
It is small (a 7B source has about 360k gates), so every rank holds all of it, and three things FSDP would
have done for it are done here, by the `pruning` callback:

- `replicate_`: at Event.INIT, parameters built on the meta device (`init_device: meta | mixed`) are
  materialised, the module is moved to the training device (FSDP moves only what it wraps) and rank 0's
  values (its importance order) are broadcast, so every rank starts identical.
- `average_gradients_`: after every backward under FSDP, the gates' and multipliers' gradients are
  averaged over ranks (DDP, which wraps the whole model, already does it). Averaging an accumulated
  gradient again is exact for the part already averaged, so it can run after every microbatch.
- `PruningGradientClipping`: the yaml's `gradient_clipping` clips the model's weights only. The gates and
  multipliers train by Adam, whose step is already normalised; clipping them multiplies their gradient by
  a factor that changes every step for reasons of its own. Measured on the demo (seed 17, docs/results.md):
  one joint norm with the model (what DDP clipping did before) scaled the gates by 1/‖model grad‖, which
  swings 5-70 between steps, and let the expected size ring ±0.024 after the ramp; a norm of their own
  (the reference's FSDP1, where the L0 module was its own root) tracked within 0.009 but wrecked the pruned
  model (eval loss 10.7 at step 30 against 6.4); left unclipped they tracked within 0.003 through the ramp
  with the joint norm's quality. `pruning.clip_l0_gradients: true` restores the reference's separate norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from composer.algorithms import GradientClipping
from composer.algorithms.gradient_clipping.gradient_clipping import _apply_agc
from composer.core import Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from drpruning.pruning.masks import L0Module

L0_PREFIX = "l0_module."


@torch.no_grad()
def replicate_(l0: L0Module, device: torch.device, broadcast: bool = True) -> None:
    """Materialise meta parameters, move to `device`, and make every rank hold rank 0's values (one
    broadcast; `broadcast=False` under DDP, whose wrapping copies rank 0's parameters already)."""
    if any(p.is_meta for p in l0.parameters()):
        l0.to_empty(device=device)
        l0.reset_parameters()  # rank 0's real values (its importance order) arrive by the broadcast below
    l0.to(device)
    if broadcast and dist.get_world_size() > 1:
        params = list(l0.parameters())
        with torch.no_grad():
            flat = torch.cat([p.reshape(-1) for p in params])
            dist.broadcast(flat, src=0)
            for p, value in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.copy_(value.view_as(p))


@torch.no_grad()
def average_gradients_(l0: L0Module) -> None:
    """Average the L0 gradients over ranks in one all-reduce (every rank computes them from its own batch)."""
    if dist.get_world_size() <= 1:
        return
    params = [p for p in l0.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, reduce_operation="SUM")
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the model's trainable parameters, the L0 module's), by name."""
    weights, l0 = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (l0 if L0_PREFIX in name else weights).append(param)
    return weights, l0


def clip_(params: Iterable[nn.Parameter], clipping_type: str, threshold: float) -> None:
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if clipping_type == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_norm=threshold)
    elif clipping_type == "value":
        torch.nn.utils.clip_grad_value_(params, clip_value=threshold)
    elif clipping_type == "adaptive":
        _apply_agc(params, clipping_threshold=threshold)
    else:
        raise ValueError(f"clipping_type must be 'adaptive', 'norm' or 'value', not {clipping_type!r}")


class PruningGradientClipping(GradientClipping):
    """Composer's `gradient_clipping` over the model's weights only; the L0 module's gradients are clipped
    on a norm of their own when `clip_l0` (the reference's behaviour), else left to Adam.

    The pruning callback puts it in place of the yaml's `gradient_clipping` at Event.INIT (same type and
    threshold). Under FSDP1 the model is clipped by its FSDP roots as Composer does; under FSDP2 and DDP by
    `torch.nn.utils` over its own parameters (Composer 0.32's FSDP2 path would pass sharded and replicated
    parameters to one `clip_grad_norm_`)."""

    def __init__(self, clipping_type: str, clipping_threshold: float, clip_l0: bool = False):
        super().__init__(clipping_type, clipping_threshold)
        self.clip_l0 = clip_l0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event != Event.AFTER_TRAIN_BATCH:
            return
        weights, l0 = split_parameters(state.model)
        fsdp1_roots = [m for m in state.model.modules()
                       if isinstance(m, FullyShardedDataParallel) and m.check_is_root()]  # fmt: skip
        if fsdp1_roots and self.clipping_type in ("norm", "value"):
            norm_type = 2.0 if self.clipping_type == "norm" else float("inf")
            for root in fsdp1_roots:
                root.clip_grad_norm_(max_norm=self.clipping_threshold, norm_type=norm_type)
        else:
            clip_(weights, self.clipping_type, self.clipping_threshold)
        if self.clip_l0:
            clip_(l0, self.clipping_type, self.clipping_threshold)


def replace_gradient_clipping_(state: State, clip_l0: bool = False) -> bool:
    """Swap the run's `GradientClipping` algorithm for `PruningGradientClipping` in place; True if it did."""
    for index, algorithm in enumerate(state.algorithms):
        if type(algorithm) is GradientClipping:
            state.algorithms[index] = PruningGradientClipping(algorithm.clipping_type, algorithm.clipping_threshold,
                                                              clip_l0)  # fmt: skip
            return True
    return False
