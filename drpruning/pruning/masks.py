"""Hard-concrete L0 gates and the Lagrangian that lands them exactly on a target shape (Louizos et al. 2018;
Sheared-LLaMA, paper §2.1).

`L0Module` owns one gate tensor per pruning module and the Lagrange multipliers. In training it samples
gates (one sample per gate per forward) and returns the Lagrangian; in eval it returns deterministic
masks. Those score the **current** model by default (per row, the round(Σ score) highest-scoring units,
the size the gates currently expect), as the reference scripts do (`eval_target_model: false`): the
target-shaped model, whose kept units early on are chosen by barely-trained gates, scores worse than a
uniform guess and hides which domains the model is losing (paper §2.1, `docs/reference-differences.md`).
`eval_masks: target` scores the target shape instead; export always keeps exactly the target count
(`target_masks`).

The gate maths is fp32 whatever the run's precision: the module is never sharded or cast by FSDP
(`_fsdp_wrap = False`; at most a few hundred thousand values, replicated on every rank) and `forward` runs
with autocast off. `drpruning/pruning/l0_training.py` does what FSDP would otherwise have done for it.

Masks by name, for L layers, d hidden, K KV heads, F FFN units: `layer [L]`, `head [L, K]` (a KV group
with its query heads), `intermediate [L, F]`, `hidden [d]`; `drpruning/pruning/prunable.py` says where
each one multiplies, and `drpruning/export/dense.py` folds them into a smaller model with the same logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from drpruning.errors import ShapeError
from drpruning.pruning.shapes import PRUNING_MODULES, ModelShape, mask_shapes, module_sizes, target_shape

STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
EPSILON = 1e-6
# log alpha is kept in [-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND] so a gate never saturates beyond recovery.
LOG_ALPHA_BOUND = math.log(100.0)
# P(z > 0) = sigmoid(log_alpha - SCORE_SHIFT)
SCORE_SHIFT = TEMPERATURE * math.log(-STRETCH_LOW / STRETCH_HIGH)
# What the eval-mode masks keep per row: the current expected count, or the final target count.
EVAL_MASKS = ("current", "target")
# How the gates start: all at `init_log_alpha` (the paper), or ordered by measured importance (`order_gates_`).
INITS = ("uniform", "importance")
# Importance init spreads log alpha over [init_log_alpha - band, init_log_alpha] by rank. With the default 2.0
# every score stays within 0.015 of the uniform start's 0.998 (expected sparsity 0.007 instead of 0.002 per
# module), so the Lagrangian starts where it does today, while the band is 4x the demo's gate lr (one Adam
# step moves a gate by about lr), so the order is not erased by the first few noisy updates.
IMPORTANCE_BAND = 2.0


def sample_gates(log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One hard-concrete sample per gate: stretched, clamped binary-concrete noise."""
    u = torch.empty_like(log_alpha).uniform_(EPSILON, 1.0 - EPSILON, generator=generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)


def gate_scores(log_alpha: Tensor) -> Tensor:
    """Probability that each gate is non-zero, P(z > 0)."""
    return torch.sigmoid(log_alpha - SCORE_SHIFT)


def top_k_mask(scores: Tensor, keep: int) -> Tensor:
    """1.0 for the `keep` highest-scoring units of each row (ties to the lower index), 0.0 elsewhere."""
    order = torch.argsort(scores.detach(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.float32)
    return mask.scatter_(-1, order[..., :keep], 1.0)


class L0Module(nn.Module):
    """Gates for `pruning_modules` and per-module Lagrange multipliers for a source → target shape.

    Parameters (names matter for optimizer param groups):
      `gates.<module>`: log alpha of each gate; `lambda_1.<module>`, `lambda_2.<module>`: shape [1] each.
    """

    # Composer's FSDP (1 and 2) skips a child marked so: the gates stay fp32 under `mixed_precision: PURE`,
    # where a bf16 cast would move the expected sparsity by ~1e-3 and swallow the target's per-step increment.
    _fsdp_wrap = False

    def __init__(
        self,
        source: ModelShape,
        target: Mapping[str, Any],
        pruning_modules: Iterable[str] = PRUNING_MODULES,
        lagrangian_warmup: int = 0,
        init_log_alpha: float = LOG_ALPHA_BOUND,
        eval_masks: str = "current",
        init: str = "uniform",
        init_band: float = IMPORTANCE_BAND,
        init_lambda_1: float = 0.0,
        init_lambda_2: float = 0.0,
        freeze_masks_at: int | None = None,
    ):
        super().__init__()
        self.source = source
        self.pruning_modules = tuple(pruning_modules)
        self.target = target_shape(source, target, self.pruning_modules)
        if isinstance(lagrangian_warmup, bool) or not isinstance(lagrangian_warmup, int) or lagrangian_warmup < 0:
            raise ShapeError(f"lagrangian_warmup={lagrangian_warmup!r} must be a non-negative number of batches "
                             "(the model reads yaml durations such as '640ba')")
        self.lagrangian_warmup = lagrangian_warmup
        if not -LOG_ALPHA_BOUND <= init_log_alpha <= LOG_ALPHA_BOUND:
            raise ShapeError(f"init_log_alpha={init_log_alpha} is outside ±{LOG_ALPHA_BOUND:.3f}")
        if eval_masks not in EVAL_MASKS:
            raise ShapeError(f"eval_masks={eval_masks!r} must be one of {', '.join(EVAL_MASKS)}: 'current' scores "
                             "the model the gates currently expect (the method's default), 'target' the final shape")
        self.eval_masks = eval_masks
        if init not in INITS:
            raise ShapeError(f"init={init!r} must be one of {', '.join(INITS)}: 'uniform' starts every gate at "
                             "init_log_alpha (the paper), 'importance' orders them by a calibration pass")
        if isinstance(init_band, bool) or not isinstance(init_band, int | float) or not init_band > 0:
            raise ShapeError(f"init_band={init_band!r} must be a positive number (log alpha units)")
        if init_log_alpha - init_band < -LOG_ALPHA_BOUND:
            raise ShapeError(f"init_log_alpha - init_band = {init_log_alpha - init_band:.3f} is below "
                             f"-{LOG_ALPHA_BOUND:.3f}; use a smaller band")
        self.init, self.init_band, self.init_log_alpha = init, float(init_band), float(init_log_alpha)
        for name, value in (("init_lambda_1", init_lambda_1), ("init_lambda_2", init_lambda_2)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ShapeError(f"{name}={value!r} must be a finite number")
        if init_lambda_2 < 0:
            raise ShapeError(f"init_lambda_2={init_lambda_2} must be >= 0: a negative quadratic term rewards "
                             "leaving the target")
        self.init_lambda_1, self.init_lambda_2 = float(init_lambda_1), float(init_lambda_2)
        if freeze_masks_at is not None and (isinstance(freeze_masks_at, bool) or not isinstance(freeze_masks_at, int)
                                            or freeze_masks_at < lagrangian_warmup):  # fmt: skip
            raise ShapeError(f"freeze_masks_at={freeze_masks_at!r} must be a number of batches at or after the end of "
                             f"lagrangian_warmup ({lagrangian_warmup}): the target must be reached before the units "
                             "are fixed")  # fmt: skip
        # From this batch on, training uses the export's units (target masks, hard 0/1) and the gates and
        # multipliers stop moving (the `pruning` callback sets their lr to 0): the last steps train exactly
        # the model that is exported.
        self.freeze_masks_at = freeze_masks_at

        sizes, target_sizes, shapes = module_sizes(source), module_sizes(self.target), mask_shapes(source)
        self.keep = {m: target_sizes[m] for m in self.pruning_modules}
        self.final_sparsity = {m: 1.0 - target_sizes[m] / sizes[m] for m in self.pruning_modules}
        self.gates = nn.ParameterDict({
            m: nn.Parameter(torch.empty(*shapes[m], dtype=torch.float32)) for m in self.pruning_modules
        })
        # The paper starts both multipliers at 0. A stiff start (init_lambda_2 ~ 1e3) stops the min-max
        # game winding up when the budget is short (docs/results.md, "The Lagrangian controller").
        self.lambda_1 = nn.ParameterDict({m: nn.Parameter(torch.empty(1, dtype=torch.float32))
                                          for m in self.pruning_modules})
        self.lambda_2 = nn.ParameterDict({m: nn.Parameter(torch.empty(1, dtype=torch.float32))
                                          for m in self.pruning_modules})
        self.reset_parameters()
        # Set every training step by the `pruning` callback; drives the target-sparsity warmup.
        self.train_step: int | None = None
        # Gate noise is a pure function of (seed, rank, step, forward within the step), so a resumed run
        # draws exactly what an uninterrupted one would (Composer restores no RNG state mid-epoch).
        self.noise_seed, self.noise_rank = 0, 0
        self.last_target_masks: dict[str, Tensor] | None = None
        self._noise_step, self._noise_forwards = -1, 0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The starting values: every gate at `init_log_alpha`, the multipliers at their `init_lambda_*`.
        Also what materialises parameters built on the meta device (`init_device: meta | mixed`)."""
        for log_alpha in self.gates.values():
            log_alpha.fill_(self.init_log_alpha)
        for m in self.pruning_modules:
            self.lambda_1[m].fill_(self.init_lambda_1)
            self.lambda_2[m].fill_(self.init_lambda_2)

    # ---- sizes -------------------------------------------------------------------------------------

    def target_sparsity(self, step: int) -> dict[str, float]:
        """Per-module target, ramping linearly from 0 to its final value over `lagrangian_warmup` batches."""
        ramp = 1.0 if self.lagrangian_warmup <= 0 else min(1.0, step / self.lagrangian_warmup)
        return {m: s * ramp for m, s in self.final_sparsity.items()}

    def expected_params(self, scores: Mapping[str, Tensor]) -> Tensor:
        """Expected parameter count of the pruned model (embeddings and norms included).

        Exact for 0/1 scores: equals `ModelShape.num_params` of the shape those scores keep.
        """
        src = self.source
        ones = next(iter(scores.values())).new_ones
        layer = scores.get("layer", ones(src.n_layers))
        heads = scores.get("head", ones(src.n_layers, src.n_kv_heads)).sum(-1)
        units = scores.get("intermediate", ones(src.n_layers, src.intermediate_size)).sum(-1)
        dims = scores.get("hidden", ones(src.hidden_size)).sum()
        return (layer * src.params_per_layer(heads, units, dims)).sum() + src.params_outside_layers(dims)

    def scores(self) -> dict[str, Tensor]:
        return {m: gate_scores(log_alpha) for m, log_alpha in self.gates.items()}

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        """Returns (masks, lagrangian or None in eval, detached stats for logging), all computed in fp32."""
        device = next(iter(self.gates.values())).device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._forward_fp32()

    def _forward_fp32(self) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        if not self.training:
            # Cached here, where FSDP has gathered the gates: the pruning callback dumps them after evals.
            self.last_target_masks = self.target_masks()
            return (self.last_target_masks if self._evals_score_target() else self.current_masks()), None, {}
        if self.train_step is None:
            raise RuntimeError(
                "L0Module.train_step was never set: add the `pruning` callback (callbacks: {pruning: {}}) "
                "to the training yaml; it feeds the step that drives the target-sparsity warmup"
            )
        generator = self._noise_generator(next(iter(self.gates.values())).device)
        masks = {m: sample_gates(log_alpha, generator) for m, log_alpha in self.gates.items()}
        if self.masks_frozen(self.train_step):
            masks = self.target_masks()
        scores = self.scores()
        targets = self.target_sparsity(self.train_step)
        lagrangian = torch.zeros((), device=masks[self.pruning_modules[0]].device)
        stats: dict[str, Tensor] = {}
        for m, score in scores.items():
            row_sparsity = 1.0 - score.mean(-1)  # one value per row (a scalar for layer/hidden)
            gap = row_sparsity - targets[m]
            lagrangian = lagrangian + (self.lambda_1[m] * gap + self.lambda_2[m] * gap.square()).mean()
            stats[f"expected_sparsity/{m}"] = row_sparsity.mean().detach()
            stats[f"target_sparsity/{m}"] = score.new_tensor(targets[m])
            stats[f"lambda_1/{m}"] = self.lambda_1[m].detach().reshape(())
            stats[f"lambda_2/{m}"] = self.lambda_2[m].detach().reshape(())
        stats["expected_params"] = self.expected_params({m: s.detach() for m, s in scores.items()})
        if self.masks_frozen(self.train_step):
            # The units are fixed: no constraint to enforce. Zero, but still a function of every gate and
            # multiplier, so DDP sees all of them used (their updates are stopped by lr 0, not by a None grad).
            lagrangian = lagrangian * 0.0
        return masks, lagrangian, stats

    def masks_frozen(self, step: int | None) -> bool:
        """True once training uses the export's units (`freeze_masks_at`)."""
        return self.freeze_masks_at is not None and step is not None and step >= self.freeze_masks_at

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self.train_step != self._noise_step:
            self._noise_step, self._noise_forwards = self.train_step, 0
        key = np.random.SeedSequence([self.noise_seed, self.noise_rank, self.train_step, self._noise_forwards])
        self._noise_forwards += 1
        generator = torch.Generator(device=device)
        generator.manual_seed(int(key.generate_state(1, np.uint64)[0]))
        return generator

    def _evals_score_target(self) -> bool:
        """`eval_masks: target`, or the units are fixed (`freeze_masks_at`): evals score the export."""
        return self.eval_masks == "target" or self.masks_frozen(self.train_step)

    @torch.no_grad()
    def deterministic_masks(self) -> dict[str, Tensor]:
        """The eval-mode masks: `target_masks()` or `current_masks()`, as `forward` uses them in eval."""
        return self.target_masks() if self._evals_score_target() else self.current_masks()

    @torch.no_grad()
    def target_masks(self) -> dict[str, Tensor]:
        """Keep exactly the target number of units per row, chosen by score; kept units have value 1.

        This is the pruned architecture: export and the mask dumps always use it."""
        return {m: top_k_mask(log_alpha, self.keep[m]) for m, log_alpha in self.gates.items()}

    @torch.no_grad()
    def current_masks(self) -> dict[str, Tensor]:
        """Keep round(Σ P(z > 0)) units per row (at least one), chosen by score; kept units have value 1.

        The model the gates currently expect: fresh gates keep (almost) every unit, converged gates the
        target count. Rows of one mask may keep different counts (each row its own expected size)."""
        masks = {}
        for m, log_alpha in self.gates.items():
            rows = gate_scores(log_alpha).reshape(-1, log_alpha.shape[-1])
            keep = rows.sum(-1).round().clamp(min=1).long()  # float32 sums: exact to ~1e-4 of a unit
            order = torch.argsort(log_alpha.detach().reshape(rows.shape), dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(rows.shape[-1], device=order.device)
                                                    .expand_as(order).contiguous())
            masks[m] = (rank < keep[:, None]).float().reshape(log_alpha.shape)
        return masks

    @staticmethod
    def mean_kept_per_row(masks: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean number of kept units per row of each mask (what a plot of the scored model's size needs)."""
        return {m: float((mask > 0).float().sum(-1).mean()) for m, mask in masks.items()}

    @torch.no_grad()
    def order_gates_(self, importance: Mapping[str, Tensor]) -> None:
        """Start from importance: per row, log alpha = init_log_alpha - init_band * rank / (n - 1).

        Rank 0 is the most important unit (ties: lower index first). Scores stay close to the uniform
        start (so the expected sparsity and the Lagrangian start where they do) but are strictly ordered,
        so `target_masks()` keeps the most important units: the one-shot importance pruning.
        Meta gates (non-zero ranks under `init_device: mixed`) are left alone; FSDP syncs them from rank 0.
        """
        missing = [m for m in self.pruning_modules if m not in importance]
        if missing:
            raise ShapeError(f"importance has no scores for {missing}")
        for m, log_alpha in self.gates.items():
            scores = torch.as_tensor(importance[m]).detach().cpu()
            if tuple(scores.shape) != tuple(log_alpha.shape):
                raise ShapeError(f"importance of {m} has shape {tuple(scores.shape)}; the gates have "
                                 f"{tuple(log_alpha.shape)}")  # fmt: skip
            if not torch.isfinite(scores).all():
                raise ShapeError(f"importance of {m} has non-finite values")
            n = scores.shape[-1]
            step = self.init_band / max(n - 1, 1)
            if n > 1 and step < 4 * float(np.spacing(np.float32(abs(self.init_log_alpha) + self.init_band))):
                raise ShapeError(f"init_band={self.init_band} cannot order {n} {m} units in float32; use a wider band")
            order = torch.argsort(scores, dim=-1, descending=True, stable=True)
            ranks = torch.empty_like(order).scatter_(
                -1, order, torch.arange(n).expand_as(order).contiguous())  # fmt: skip
            if log_alpha.is_meta:
                continue
            values = self.init_log_alpha - ranks.to(torch.float64) * step
            log_alpha.copy_(values.to(log_alpha.dtype))

    @torch.no_grad()
    def clamp_log_alpha_(self) -> None:
        """Keep log alpha in range after an optimizer step (lr 1.0 would otherwise saturate gates)."""
        for log_alpha in self.gates.values():
            log_alpha.clamp_(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)

    def describe(self) -> dict[str, Any]:
        """Plain-data description, written next to mask dumps so export can rebuild the shapes."""
        return {
            "pruning_modules": list(self.pruning_modules),
            "source_shape": dataclasses.asdict(self.source),
            "target_shape": dataclasses.asdict(self.target),
            "final_sparsity": dict(self.final_sparsity),
            "lagrangian_warmup": self.lagrangian_warmup,
            "eval_masks": self.eval_masks,
            "init": self.init,
            "init_lambda_1": self.init_lambda_1,
            "init_lambda_2": self.init_lambda_2,
            "freeze_masks_at": self.freeze_masks_at,
            "source_params": self.source.num_params(),
            "target_params": self.target.num_params(),
        }
