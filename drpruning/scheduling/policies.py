"""Data-scheduling policies (paper §3): per-domain losses in, sampling proportions out. Pure numpy.

Each policy is one object whose whole mutable state round-trips through `state_dict()` as plain
lists/floats/ints/str/None, so the scheduler callback can checkpoint it and broadcast it to every rank.
Its options are one `PolicySettings`, the keys a `data_scheduler` yaml block may set besides the scheduler's own.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drpruning.distributions import validate_proportions
from drpruning.errors import ConfigError
from drpruning.scheduling.dro import dro_proportions, normalise_within_bounds
from drpruning.scheduling.scaling_law import predict_final_loss

POLICY_NAMES = ("constant", "sheared", "dro", "drpruning")


@dataclass(frozen=True)
class PolicySettings:
    """The policy options of a `data_scheduler` yaml block, each optional; a policy reads only its own.

    Each policy refuses a bad value of a setting it reads when it is built; the others are ignored.
    """

    dynamic_reference_loss: bool | None = None
    """`dro`/`drpruning`: replace ℓ_R by each domain's scaling-law prediction of its final loss (paper §3.3).
    Unset: on for `drpruning`, off otherwise; `constant` and `sheared` refuse it on."""

    dynamic_reference_ratio: bool | None = None
    """`dro`/`drpruning`: let p_R drift toward the proportions chosen (p_R ← δ·q + (1−δ)·p_R, paper eq. 6).
    Unset: on for `drpruning`, off otherwise; `constant` and `sheared` refuse it on."""

    rho: float = 0.1
    """`dro`/`drpruning`: radius ρ (≥ 0) of the χ² ball around p_R that q is chosen in; larger moves more
    weight toward domains above their reference loss, 0 keeps q = p_R."""

    delta: float = 0.1
    """`dro`/`drpruning`, dynamic reference ratio: δ in (0, 1], how far p_R moves toward q at each update."""

    ratio_bound: float = 2.0
    """`dro`/`drpruning`, dynamic reference ratio: n ≥ 1, p_R stays within [p0/n, n·p0] domain by domain."""

    reference_loss_start: float = 0.2
    """`dro`/`drpruning`, dynamic reference loss: fraction of training in [0, 1] before which no
    scaling-law fit changes ℓ_R."""

    reference_ratio_start: float = 0.4
    """`dro`/`drpruning`, dynamic reference ratio: fraction of training in [0, 1] before which p_R stays put."""

    min_points: int = 8
    """`dro`/`drpruning`, dynamic reference loss: (P, T, ℓ) points (≥ 5) a domain needs before its first fit."""

    max_history: int = 64
    """`dro`/`drpruning`, dynamic reference loss: most points kept (≥ min_points); beyond it the point
    closest to its neighbours in log-progress is dropped, so the history spans the whole run."""

    clamp_ratio_to_initial_range: bool = True
    """`dro`/`drpruning`, dynamic reference ratio: after the drift, also keep p_R within [min p0, max p0]
    (the reference code, on in the paper's runs; with uniform p0 it freezes p_R)."""

    eta: float = 1.0
    """`sheared`: step size η (≥ 0) of q ∝ q_prev·exp(η·Δ)."""

    smoothing: float = 1e-4
    """`sheared`: c in [0, 1] of the final mix (1−c)·q + c/n with the uniform distribution."""

    clip_excess: bool = False
    """`sheared`: Δ = max(ℓ − ℓ_ref, 0) (Sheared-LLaMA's paper) instead of the unclipped Δ = ℓ − ℓ_ref its
    code used, which produced the DRPruning paper's ReSheared baseline."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, owner: str = "policy",
                     also_valid: Iterable[str] = ()) -> PolicySettings:
        """Settings from yaml keys; an unknown key is refused by name, with the list of valid ones
        (`also_valid`: the caller's own keys, so the list is complete for `owner`'s yaml block)."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            valid = sorted({*cls.names(), *also_valid})
            raise ConfigError(f"unknown {owner} option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**options)

    def for_policy(self, name: str) -> PolicySettings:
        """These settings with the dynamic parts resolved for policy `name`: unset means on for
        `drpruning` and off otherwise; switching one off under `drpruning` (or on under `dro`) gives the
        paper's ablations, and `constant` / `sheared` have no dynamic parts to switch on."""
        dynamic_default = name == "drpruning"
        loss = dynamic_default if self.dynamic_reference_loss is None else self.dynamic_reference_loss
        ratio = dynamic_default if self.dynamic_reference_ratio is None else self.dynamic_reference_ratio
        if name in ("constant", "sheared") and (loss or ratio):
            raise ConfigError(f"dynamic_reference_loss / dynamic_reference_ratio apply to dro and drpruning, not '{name}'")
        return dataclasses.replace(self, dynamic_reference_loss=loss, dynamic_reference_ratio=ratio)


@dataclass(frozen=True)
class Observation:
    """What the scheduler measured at one update (all ranks already reduced)."""

    losses: np.ndarray  # [D] current per-domain loss (eval CE or train EMA)
    tokens: np.ndarray  # [D] tokens of each domain consumed since the start of training
    progress: float  # batch / max_batches, in (0, 1]
    params: float | None = None  # expected remaining parameters (pruning), None in continued pretraining
    params_end: float | None = None  # target parameters at the end of pruning


@dataclass(frozen=True)
class Decision:
    """The new proportions and the inputs that produced them, so each update can be audited."""

    proportions: np.ndarray
    reference_losses: np.ndarray | None  # ℓ_R used for this update (None if the policy has none)
    reference_ratio: np.ndarray  # p_R used for this update


class Policy(ABC):
    """Base class: holds p0 and the (optional) reference losses; subclasses implement `update`."""

    name: str
    needs_reference_losses: bool

    def __init__(self, initial_proportions: Sequence[float] | np.ndarray,
                 reference_losses: Sequence[float] | np.ndarray | None = None) -> None:
        initial = validate_proportions(initial_proportions, name="initial_proportions")
        self.initial_proportions = initial / initial.sum()
        self.num_domains = self.initial_proportions.size
        self._reference_losses: np.ndarray | None = None
        if reference_losses is not None:
            self.set_reference_losses(reference_losses)

    @property
    def reference_losses(self) -> np.ndarray | None:
        return None if self._reference_losses is None else self._reference_losses.copy()

    def set_reference_losses(self, values: Sequence[float] | np.ndarray) -> None:
        """Set ℓ_R (from the config or from the source model's first eval)."""
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.num_domains,) or not np.all(np.isfinite(array)):
            raise ValueError(f"reference losses must be {self.num_domains} finite values, got {array.tolist()}")
        self._reference_losses = array.copy()

    @property
    def ready(self) -> bool:
        """False while the policy is waiting for reference losses it needs."""
        return not self.needs_reference_losses or self._reference_losses is not None

    def update(self, observation: Observation) -> Decision:
        """The proportions for the next interval; raises if the policy is not `ready`."""
        losses = np.asarray(observation.losses, dtype=np.float64)
        if losses.shape != (self.num_domains,) or not np.all(np.isfinite(losses)):
            raise ValueError(f"losses must be {self.num_domains} finite values, got {losses.tolist()}")
        if not 0.0 <= observation.progress <= 1.0 + 1e-9:  # 0: a step-0 update (first_eval_update)
            raise ValueError(f"progress must lie in [0, 1], got {observation.progress}")
        if not self.ready:
            raise RuntimeError(f"policy '{self.name}' has no reference losses yet")
        return self._update(observation)

    @abstractmethod
    def _update(self, observation: Observation) -> Decision: ...

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reference_losses": _plain(self._reference_losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["name"] != self.name:
            raise ConfigError(f"checkpoint holds policy '{state['name']}' but this run uses '{self.name}'")
        self._reference_losses = None
        if state["reference_losses"] is not None:
            self.set_reference_losses(state["reference_losses"])


class ConstantPolicy(Policy):
    """q = p0 (the static-mixture baseline)."""

    name = "constant"
    needs_reference_losses = False

    def _update(self, observation: Observation) -> Decision:
        return Decision(self.initial_proportions.copy(), self.reference_losses, self.initial_proportions.copy())


class ShearedPolicy(Policy):
    """Sheared-LLaMA dynamic batch loading: q ∝ q_prev·exp(η·Δ), then (1−c)·q + c/n.

    Δ = ℓ − ℓ_ref by default, as Sheared-LLaMA's code (and so the DRPruning paper's ReSheared baseline)
    ran it: a domain below its reference is pushed down. `clip_excess=True` gives Δ = max(ℓ − ℓ_ref, 0),
    the Sheared-LLaMA paper's Algorithm 1, where such a domain only keeps its weight (relative to others).
    """

    name = "sheared"
    needs_reference_losses = True

    def __init__(self, initial_proportions: Sequence[float] | np.ndarray,
                 reference_losses: Sequence[float] | np.ndarray | None, settings: PolicySettings) -> None:
        super().__init__(initial_proportions, reference_losses)
        if not math.isfinite(settings.eta) or settings.eta < 0:
            raise ConfigError(f"eta must be finite and ≥ 0, got {settings.eta}")
        if not 0.0 <= settings.smoothing <= 1.0:
            raise ConfigError(f"smoothing must lie in [0, 1], got {settings.smoothing}")
        self.eta = float(settings.eta)
        self.smoothing = float(settings.smoothing)
        self.clip_excess = bool(settings.clip_excess)
        self.proportions = self.initial_proportions.copy()

    def _update(self, observation: Observation) -> Decision:
        assert self._reference_losses is not None
        gap = np.asarray(observation.losses, dtype=np.float64) - self._reference_losses
        if self.clip_excess:
            gap = np.maximum(gap, 0.0)
        with np.errstate(divide="ignore"):
            logits = np.log(self.proportions) + self.eta * gap
        weights = np.exp(logits - logits.max())
        proportions = weights / weights.sum()
        proportions = (1.0 - self.smoothing) * proportions + self.smoothing / self.num_domains
        self.proportions = proportions / proportions.sum()
        return Decision(self.proportions.copy(), self.reference_losses, self.initial_proportions.copy())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "proportions": _plain(self.proportions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.proportions = validate_proportions(state["proportions"], self.num_domains, "saved proportions")


class DROPolicy(Policy):
    """χ²-ball DRO around p_R with reference losses ℓ_R; `drpruning` switches on the dynamic parts.

    Each update, in the paper's order (§3.3 "Overall process"):
    1. record (P, T, ℓ) per domain in the history (when the dynamic reference loss is on);
    2. from `reference_loss_start` of training, per domain once it has `min_points` points:
       baseline = min(scaling-law prediction at the end of training, lowest observed loss); at the
       domain's first fit ℓ_R ← baseline (replacing the configured or `source` value, so it may go
       up), afterwards ℓ_R ← min(ℓ_R, baseline) (it never rises again) — the reference code's rule;
    3. q = DRO(ℓ, ℓ_R, p_R, ρ), floored at min(p_R);
    4. from `reference_ratio_start`: p_R ← δ·q + (1−δ)·p_R clamped to [p0/n, n·p0] and renormalised,
       then (`clamp_ratio_to_initial_range`, on in every version of the reference code) clamped to
       [min p0, max p0] and renormalised. With uniform p0 that second clamp freezes p_R at p0.
    """

    needs_reference_losses = True

    def __init__(self, initial_proportions: Sequence[float] | np.ndarray,
                 reference_losses: Sequence[float] | np.ndarray | None, settings: PolicySettings) -> None:
        """`settings` with the dynamic parts resolved (`PolicySettings.for_policy`)."""
        super().__init__(initial_proportions, reference_losses)
        if not math.isfinite(settings.rho) or settings.rho < 0:
            raise ConfigError(f"rho must be finite and ≥ 0, got {settings.rho}")
        if not 0.0 < settings.delta <= 1.0:
            raise ConfigError(f"delta must lie in (0, 1], got {settings.delta}")
        if not (math.isfinite(settings.ratio_bound) and settings.ratio_bound >= 1.0):
            raise ConfigError(f"ratio_bound must be ≥ 1, got {settings.ratio_bound}")
        for key, value in (("reference_loss_start", settings.reference_loss_start),
                           ("reference_ratio_start", settings.reference_ratio_start)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} is a fraction of training and must lie in [0, 1], got {value}")
        if settings.min_points < 5:
            raise ConfigError(f"min_points must be ≥ 5 (the fit has up to 4 parameters), got {settings.min_points}")
        if settings.max_history < settings.min_points:
            raise ConfigError(f"max_history ({settings.max_history}) must be ≥ min_points ({settings.min_points})")
        self.dynamic_reference_loss = bool(settings.dynamic_reference_loss)
        self.dynamic_reference_ratio = bool(settings.dynamic_reference_ratio)
        self.name = "drpruning" if self.dynamic_reference_loss or self.dynamic_reference_ratio else "dro"
        self.rho = float(settings.rho)
        self.delta = float(settings.delta)
        self.ratio_bound = float(settings.ratio_bound)
        self.reference_loss_start = float(settings.reference_loss_start)
        self.reference_ratio_start = float(settings.reference_ratio_start)
        self.min_points = int(settings.min_points)
        self.max_history = int(settings.max_history)
        self.clamp_ratio_to_initial_range = bool(settings.clamp_ratio_to_initial_range)
        self.reference_ratio = self.initial_proportions.copy()
        self.history: list[dict[str, Any]] = []
        # Per domain: has a scaling-law fit set ℓ_R yet? The first fit replaces ℓ_R, later ones only lower it.
        self.fitted = np.zeros(self.num_domains, dtype=bool)

    def _update(self, observation: Observation) -> Decision:
        assert self._reference_losses is not None
        losses = np.asarray(observation.losses, dtype=np.float64)
        if self.dynamic_reference_loss:
            self._record(observation)
            if observation.progress >= self.reference_loss_start:
                self._fit_reference_losses(observation)
        reference_ratio = self.reference_ratio.copy()
        proportions = dro_proportions(losses, self._reference_losses, reference_ratio, self.rho)
        if self.dynamic_reference_ratio and observation.progress >= self.reference_ratio_start:
            self.reference_ratio = drift_reference_ratio(reference_ratio, proportions, self.initial_proportions,
                                                         self.delta, self.ratio_bound,
                                                         self.clamp_ratio_to_initial_range)
        return Decision(proportions, self.reference_losses, reference_ratio)

    def _record(self, observation: Observation) -> None:
        tokens = np.asarray(observation.tokens, dtype=np.float64)
        if tokens.shape != (self.num_domains,):
            raise ValueError(f"tokens must have {self.num_domains} entries, got {tokens.tolist()}")
        self.history.append({
            "progress": float(observation.progress),
            "params": None if observation.params is None else float(observation.params),
            "tokens": tokens.tolist(),
            "losses": np.asarray(observation.losses, dtype=np.float64).tolist(),
        })
        if len(self.history) > self.max_history:
            del self.history[_most_redundant_point([entry["progress"] for entry in self.history])]

    def _fit_reference_losses(self, observation: Observation) -> None:
        assert self._reference_losses is not None
        tokens = np.array([entry["tokens"] for entry in self.history])
        losses = np.array([entry["losses"] for entry in self.history])
        params_history = [entry["params"] for entry in self.history]
        params = None if any(value is None for value in params_history) else np.array(params_history)
        tokens_end = np.asarray(observation.tokens, dtype=np.float64) / observation.progress
        for domain in range(self.num_domains):
            prediction = predict_final_loss(losses[:, domain], tokens[:, domain], params, float(tokens_end[domain]),
                                            observation.params_end, min_points=self.min_points)
            if prediction is None:
                continue
            # `predict_final_loss` already caps the prediction at the lowest observed loss (the baseline).
            if self.fitted[domain]:
                self._reference_losses[domain] = min(self._reference_losses[domain], prediction)
            else:
                self._reference_losses[domain] = prediction
                self.fitted[domain] = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reference_ratio": _plain(self.reference_ratio),
                "history": [dict(entry) for entry in self.history], "fitted": self.fitted.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.reference_ratio = validate_proportions(state["reference_ratio"], self.num_domains, "saved reference_ratio")
        self.history = [dict(entry) for entry in state["history"]]
        if "fitted" not in state:
            raise ValueError("the checkpoint's drpruning policy state predates the first-fit reference-loss rule "
                             "(no 'fitted' flags); start a new run")
        self.fitted = np.array(state["fitted"], dtype=bool)
        if self.fitted.shape != (self.num_domains,):
            raise ValueError(f"saved 'fitted' flags have {self.fitted.size} entries, expected {self.num_domains}")


def drift_reference_ratio(reference_ratio: np.ndarray, proportions: np.ndarray, initial_proportions: np.ndarray,
                          delta: float, ratio_bound: float, clamp_to_initial_range: bool = True) -> np.ndarray:
    """p_R ← δ·q + (1−δ)·p_R, then every domain kept within [p0/n, n·p0] with Σ = 1 (paper eq. 6).

    With `clamp_to_initial_range` (every version of the reference code; the paper is silent), each domain
    is then also kept within [min_g p0_g, max_g p0_g] with Σ = 1: on the multilingual p0 this holds th
    and ko at ≥ 5.82 % and en at ≤ 27.7 % (paper Table 7). Both steps are "clamp then renormalise" done
    so that the bounds still hold after renormalising (`normalise_within_bounds`)."""
    p0 = np.asarray(initial_proportions, dtype=np.float64)
    moved = delta * np.asarray(proportions, dtype=np.float64) + (1.0 - delta) * np.asarray(reference_ratio)
    drifted = normalise_within_bounds(moved, p0 / ratio_bound, np.minimum(p0 * ratio_bound, 1.0))
    if not clamp_to_initial_range:
        return drifted
    lower, upper = np.full_like(p0, p0.min()), np.full_like(p0, p0.max())
    return normalise_within_bounds(drifted, lower, upper)


def _most_redundant_point(progress: list[float]) -> int:
    """The interior point whose removal leaves the smallest gap in log-progress.

    Keeps the history spread over the whole run on the log scale a power law is fitted on, and is
    deterministic (a resumed run thins exactly as an uninterrupted one).
    """
    log_progress = np.log(np.asarray(progress, dtype=np.float64))
    gaps = log_progress[2:] - log_progress[:-2]
    return int(np.argmin(gaps)) + 1


def make_policy(name: str, initial_proportions: Sequence[float] | np.ndarray,
                reference_losses: Sequence[float] | np.ndarray | None = None,
                settings: PolicySettings | None = None) -> Policy:
    """Build policy `name` (one of POLICY_NAMES) with `settings` (default: every setting at its default)."""
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")
    settings = (settings or PolicySettings()).for_policy(name)
    if name == "constant":
        return ConstantPolicy(initial_proportions, reference_losses)
    if name == "sheared":
        return ShearedPolicy(initial_proportions, reference_losses, settings)
    return DROPolicy(initial_proportions, reference_losses, settings)


def _plain(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else np.asarray(values, dtype=np.float64).tolist()
