"""`DataScheduler`: the Composer callback that runs a data policy every `update_interval` batches and
drives the domain mixer (paper §3; what it needs from them: `drpruning/scheduling/contracts.py`).

Every rank takes part in the collectives (per-domain train statistics, eval-metric syncs, the
broadcast); the policy itself runs on global rank 0 and its decision and new state are broadcast, so
every rank holds the identical proportions and the identical (checkpointable) policy state.

Use `eval_first: true` with `reference_losses: source` so that the source model's per-domain eval loss
is measured before the first step; without it the first periodic eval is used (and a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from drpruning.distributions import in_domain_order, validate_proportions
from drpruning.errors import ConfigError
from drpruning.runs import (
    DATA_METRICS_PREFIX,
    SCHEDULE_FILE,
    check_run_folder,
    keep_jsonl_lines,
    run_folder,
    start_run_in_folder,
    unwrap_model,
)
from drpruning.scheduling.contracts import DistillingModel, DomainStatsModel, MixtureDataset
from drpruning.scheduling.measurement import (
    LossEma,
    log_schedule_record,
    read_eval_losses,
    schedule_record,
    source_losses,
    summed_over_ranks,
    write_data_usage,
)
from drpruning.scheduling.policies import Observation, Policy, PolicySettings, make_policy

log = logging.getLogger(__name__)

_STATE_VERSION = 1
# The callback's own yaml keys; every other key is a `PolicySettings` field.
_SCHEDULER_OPTIONS = ("policy", "update_interval", "loss_source", "reference_losses", "initial_proportions", "ema",
                      "on_nan", "first_eval_update")
# The policies whose reference code updated at the `eval_first` eval (step 0): Sheared-LLaMA's dynamic loading
# callback updated at every eval_end, the first included; the DRO callback's runs disabled eval_first.
_FIRST_EVAL_POLICIES = ("sheared",)


@dataclass(frozen=True)
class SharedDecision:
    """What rank 0 broadcasts after an update: plain types only, identical on every rank."""

    proportions: list[float]
    reference_losses: list[float] | None
    reference_ratio: list[float]
    expected_params: float | None
    policy_state: dict[str, Any]


class DataScheduler(Callback):
    """Per-domain data proportions from `constant`, `sheared`, `dro` or `drpruning` (see `drpruning.scheduling.policies`).

    Args (the yaml keys of the `data_scheduler` callback):
        policy: `constant | sheared | dro | drpruning`.
        update_interval: batches between updates, an integer ≥ 1 (with `loss_source: eval`, set
            `eval_interval` to match).
        loss_source: `eval` (per-domain eval CE, read at EVAL_AFTER_ALL) or `train_ema`
            (EMA of the per-domain train CE, updated every batch, read at BATCH_END).
        reference_losses: `{domain: loss}` for every domain, or `source` (the first eval's losses),
            or None (only for `constant`).
        initial_proportions: `{domain: p}` or a list in the mixer's domain order; default the mixer's.
        ema: λ in (0, 1] of the train-loss EMA (`loss_source: train_ema`).
        on_nan: `error` (raise, naming the domain and step) or `skip` (leave the proportions unchanged).
        first_eval_update: `sheared` only: also update at step 0 from the `eval_first` eval (the source model's
            losses), as the reference scripts did; that first factor carries through the run multiplicatively.
            Default off; other policies ignore it (the reference's DRO runs had no step-0 eval).
        **policy_settings: the fields of `drpruning.scheduling.policies.PolicySettings`, documented
            there in full; any other key is refused by name.
            dynamic_reference_loss: `dro`/`drpruning`, refit ℓ_R from scaling-law predictions (default on
                for `drpruning`, off otherwise).
            dynamic_reference_ratio: `dro`/`drpruning`, drift p_R toward q (default on for `drpruning`,
                off otherwise).
            rho: `dro`/`drpruning`, radius of the χ² ball around p_R.
            delta: `dro`/`drpruning`, step of the reference-ratio drift.
            ratio_bound: `dro`/`drpruning`, p_R stays within [p0/n, n·p0].
            reference_loss_start: `dro`/`drpruning`, fraction of training before which ℓ_R is not refit.
            reference_ratio_start: `dro`/`drpruning`, fraction of training before which p_R does not drift.
            min_points: `dro`/`drpruning`, points a domain needs before its first scaling-law fit.
            max_history: `dro`/`drpruning`, most points kept for the fits.
            clamp_ratio_to_initial_range: `dro`/`drpruning`, after the drift also keep p_R within
                [min p0, max p0] (reference code, on in the paper's runs; with uniform p0 it freezes p_R).
            eta: `sheared`, step size of the exponentiated update.
            smoothing: `sheared`, weight of the uniform distribution mixed into q.
            clip_excess: `sheared` with Δ = max(ℓ − ℓ_ref, 0) (Sheared-LLaMA's paper) instead of the
                unclipped Δ its code used, which produced the DRPruning paper's ReSheared baseline (default).
    """

    def __init__(self, policy: str = "drpruning", update_interval: int = 50, loss_source: str = "eval",
                 reference_losses: Mapping[str, float] | str | None = None,
                 initial_proportions: Mapping[str, float] | Sequence[float] | None = None,
                 ema: float = 0.1, on_nan: str = "error", first_eval_update: bool = False,
                 **policy_settings: Any) -> None:
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"update_interval must be an integer number of batches ≥ 1, got {update_interval!r}")
        if loss_source not in ("eval", "train_ema"):
            raise ConfigError(f"loss_source must be 'eval' or 'train_ema', got {loss_source!r}")
        if on_nan not in ("error", "skip"):
            raise ConfigError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
        if not isinstance(first_eval_update, bool):
            raise ConfigError(f"first_eval_update must be true or false, got {first_eval_update!r}")
        if not 0.0 < ema <= 1.0:
            raise ConfigError(f"ema must lie in (0, 1], got {ema}")
        if isinstance(reference_losses, str) and reference_losses != "source":
            raise ConfigError(f"reference_losses must be a mapping domain → loss or 'source', got {reference_losses!r}")
        if reference_losses is not None and not isinstance(reference_losses, str | Mapping):
            raise ConfigError(f"reference_losses must be a mapping domain → loss or 'source', got {reference_losses!r}")
        self.policy_settings = PolicySettings.from_options(policy_settings, owner="data_scheduler",
                                                           also_valid=_SCHEDULER_OPTIONS)
        # Surface every policy-level config error now rather than after the model has loaded.
        probe = make_policy(policy, [1.0], settings=self.policy_settings)
        if probe.needs_reference_losses and reference_losses is None:
            raise ConfigError(f"policy '{policy}' needs reference_losses: a mapping domain → loss, or 'source'")
        self.policy_name = policy
        self.update_interval = update_interval
        self.loss_source = loss_source
        self.reference_losses_config = reference_losses
        self.initial_proportions_config = initial_proportions
        self.ema = float(ema)
        self.on_nan = on_nan
        self.first_eval_update = first_eval_update and policy in _FIRST_EVAL_POLICIES

        self.policy: Policy | None = None
        self.domains: list[str] = []
        self.max_batches = 0
        self.loss_ema = LossEma([], self.ema)
        self.tokens = np.zeros(0)
        self.source_measured = False
        self.last_update_batch = 0
        self.num_updates = 0
        self._pending_state: dict[str, Any] | None = None
        self._started = False

    # ----------------------------------------------------------------------------------------- setup
    def _setup(self, state: State) -> None:
        """Bind to the mixer, model and run (idempotent); applies a checkpointed state if one is waiting."""
        if self.policy is not None:
            return
        dataset = _mixer(state)
        _model(state)  # refused here, before anything is built, rather than at the first batch
        if state.max_duration is None or state.max_duration.unit != TimeUnit.BATCH:
            raise ConfigError(f"DataScheduler needs max_duration in batches ('ba'), got {state.max_duration}")
        self.domains = [str(domain) for domain in dataset.domains]
        self.max_batches = int(state.max_duration.value)
        initial = self._resolve_initial_proportions(dataset)
        reference_losses = None
        if isinstance(self.reference_losses_config, Mapping):
            reference_losses = in_domain_order(self.reference_losses_config, self.domains, "reference_losses")
        self.policy = make_policy(self.policy_name, initial, reference_losses, self.policy_settings)
        self.loss_ema = LossEma(self.domains, self.ema)
        self.tokens = np.zeros(len(self.domains))
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        batch = int(state.timestamp.batch)
        if batch == 0 and not np.allclose(dataset.proportions_at(0), initial, rtol=0, atol=1e-12):
            dataset.set_proportions(initial, at_batch=0)

    def _start(self, state: State) -> None:
        """When the run really starts (never at a refused start): a resumed run rewrites the updates made
        after its checkpoint, so they are dropped from `schedule.jsonl`; a fresh run finds no earlier file."""
        self._setup(state)
        if self._started:
            return
        self._started = True
        start_run_in_folder(state)
        batch = int(state.timestamp.batch)
        keep_jsonl_lines(run_folder(state) / SCHEDULE_FILE, lambda record: record["step"] <= batch)

    def _resolve_initial_proportions(self, dataset: MixtureDataset) -> np.ndarray:
        config = self.initial_proportions_config
        if config is None:
            return validate_proportions(dataset.initial_proportions, len(self.domains), "the mixer's initial_proportions")
        try:
            if isinstance(config, Mapping):
                return validate_proportions(in_domain_order(config, self.domains, "initial_proportions"),
                                            name="initial_proportions")
            return validate_proportions(list(config), len(self.domains), "initial_proportions")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    # ---------------------------------------------------------------------------------------- events
    def after_load(self, state: State, logger: Logger) -> None:
        """Validate against the mixer and the model as soon as they exist, before anything is written."""
        self._setup(state)
        check_run_folder(state)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        self._start(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        """Every batch, on every rank: all-reduce the per-domain statistics (tokens for T, and the EMA)."""
        self._setup(state)
        batch = int(state.timestamp.batch)
        loss_sums, token_counts = summed_over_ranks(*_model(state).domain_stats.take(len(self.domains)))
        self.tokens = self.tokens + token_counts
        self._log_distillation(state, logger)
        if self.loss_source != "train_ema":
            return
        self.loss_ema.update(loss_sums, token_counts, lambda bad: self._non_finite(bad, batch, "train loss"))
        if batch % self.update_interval == 0:
            losses = self.loss_ema.losses(batch)
            if losses is not None:
                self._update(state, logger, losses)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        """`eval_first: true` runs a standalone eval before training: the source model's losses."""
        self._setup(state)
        self._maybe_measure_source(state)
        if self.first_eval_update and self.loss_source == "eval" and int(state.timestamp.batch) == 0:
            self._update(state, logger, read_eval_losses(state, self.domains))

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._setup(state)
        self._maybe_measure_source(state)
        batch = int(state.timestamp.batch)
        if self.loss_source == "eval" and batch > 0 and batch % self.update_interval == 0:
            self._update(state, logger, read_eval_losses(state, self.domains))

    def fit_end(self, state: State, logger: Logger) -> None:
        """Total data usage per domain (paper Table 3) to the loggers and `<run folder>/data_usage.json`."""
        self._setup(state)
        write_data_usage(state, logger, self.domains, self.tokens)
        if self.num_updates == 0:
            log.warning("DataScheduler made no update during this run: check update_interval (%d) against the "
                        "eval interval and max_duration", self.update_interval)

    # -------------------------------------------------------------------------------- measurements
    def _log_distillation(self, state: State, logger: Logger) -> None:
        """Per-domain training distillation loss of this batch (`model.distillation`), beside the LM losses."""
        model = _model(state)
        if not isinstance(model, DistillingModel) or model.distillation is None:
            return
        sums, counts = summed_over_ranks(*model.distill_stats.take(len(self.domains)))
        logger.log_metrics({f"{DATA_METRICS_PREFIX}{domain}/train_distill_loss": float(total / count)
                            for domain, total, count in zip(self.domains, sums, counts, strict=True) if count > 0})

    def _maybe_measure_source(self, state: State) -> None:
        if self.reference_losses_config != "source" or self.source_measured:
            return
        assert self.policy is not None
        self.policy.set_reference_losses(source_losses(state, self.domains))
        self.source_measured = True

    def _non_finite(self, domains: list[str], batch: int, what: str) -> None:
        message = f"DataScheduler: non-finite {what} for domain(s) {domains} at step {batch}"
        if self.on_nan == "error":
            raise FloatingPointError(message + " (set on_nan: skip to keep the current proportions instead)")
        log.warning("%s; skipped", message)

    # -------------------------------------------------------------------------------------- update
    def _update(self, state: State, logger: Logger, losses: np.ndarray) -> None:
        """One update on every rank: rank 0 decides, every rank adopts the shared decision and hands q to
        the mixer, and the decision is logged."""
        batch = int(state.timestamp.batch)
        if not self._ready_to_update(batch, losses):
            return
        decided = self._decide(state, losses, batch) if dist.get_global_rank() == 0 else None
        decision = self._share(decided, batch)
        effective_batch, applied = self._apply(state, decision.proportions)
        self.last_update_batch = batch
        self.num_updates += 1
        record = schedule_record(self.domains, batch, effective_batch, losses, decision.reference_losses,
                                 decision.reference_ratio, applied, self.tokens, decision.expected_params)
        log_schedule_record(state, logger, record)

    def _ready_to_update(self, batch: int, losses: np.ndarray) -> bool:
        """False (after a log line, or an error under `on_nan: error`) when this update must be skipped."""
        assert self.policy is not None
        if self.num_updates and batch == self.last_update_batch:
            return False
        bad = [domain for domain, value in zip(self.domains, losses, strict=True) if not np.isfinite(value)]
        if bad:
            self._non_finite(bad, batch, "loss")
            return False
        if not self.policy.ready:
            log.info("DataScheduler: step %d waits for reference losses (reference_losses: source is measured "
                     "at the first eval)", batch)
            return False
        return True

    def _decide(self, state: State, losses: np.ndarray, batch: int) -> SharedDecision | str:
        """Rank 0: the policy's decision and new state, or the error as text for the other ranks."""
        assert self.policy is not None
        stats = _model(state).pruning_stats()
        observation = Observation(
            losses=losses, tokens=self.tokens.copy(), progress=batch / self.max_batches,
            params=None if stats is None else float(stats["expected_params"]),
            params_end=None if stats is None else float(stats["target_params"]))
        try:
            decision = self.policy.update(observation)
        except Exception as error:  # every rank must leave the broadcast; every rank raises in `_share`
            log.exception("DataScheduler: policy update failed at step %d", batch)
            return repr(error)
        return SharedDecision(
            proportions=decision.proportions.tolist(),
            reference_losses=None if decision.reference_losses is None else decision.reference_losses.tolist(),
            reference_ratio=decision.reference_ratio.tolist(),
            expected_params=observation.params,
            policy_state=self.policy.state_dict())

    def _share(self, decided: SharedDecision | str | None, batch: int) -> SharedDecision:
        """Broadcast rank 0's decision (None on the other ranks) and give every rank rank 0's policy state."""
        assert self.policy is not None
        shared: list[SharedDecision | str | None] = [decided]
        dist.broadcast_object_list(shared, src=0)
        received = shared[0]
        assert received is not None
        if isinstance(received, str):
            raise RuntimeError(f"DataScheduler: the policy failed on rank 0 at step {batch}: {received}")
        if dist.get_global_rank() != 0:
            self.policy.load_state_dict(received.policy_state)
        return received

    @staticmethod
    def _apply(state: State, proportions: Sequence[float]) -> tuple[int, list[float]]:
        """Hand q to the mixer: the batch it takes effect at, and what the mixer holds (it renormalises)."""
        dataset = _mixer(state)
        effective_batch = int(dataset.set_proportions(np.asarray(proportions, dtype=np.float64)))
        return effective_batch, [float(p) for p in dataset.proportions_at(effective_batch)]

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "domains": list(self.domains),
            "policy": self.policy.state_dict(),
            "loss_ema": list(self.loss_ema.values),
            "tokens": self.tokens.tolist(),
            "source_measured": self.source_measured,
            "last_update_batch": self.last_update_batch,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by Composer before the mixer is known; applied when the callback binds (or now, if bound)."""
        if not state:
            return
        if self.policy is None:
            self._pending_state = dict(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self.policy is not None
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported DataScheduler state version {state.get('version')}")
        if list(state["domains"]) != self.domains:
            raise ConfigError(f"checkpoint domains {state['domains']} differ from the mixer's {self.domains}")
        self.policy.load_state_dict(state["policy"])
        self.loss_ema.values = [None if value is None else float(value) for value in state["loss_ema"]]
        self.tokens = np.asarray(state["tokens"], dtype=np.float64)
        self.source_measured = bool(state["source_measured"])
        self.last_update_batch = int(state["last_update_batch"])
        self.num_updates = int(state["num_updates"])


def _mixer(state: State) -> MixtureDataset:
    dataset = state.train_dataloader.dataset if state.train_dataloader is not None else None
    if not isinstance(dataset, MixtureDataset):
        raise TypeError("DataScheduler needs the domain_mixture train loader (a DomainMixtureDataset)")
    return dataset


def _model(state: State) -> DomainStatsModel:
    model = unwrap_model(state.model)
    if not isinstance(model, DomainStatsModel):
        raise TypeError("DataScheduler needs a model with per-domain statistics (drpruning_causal_lm)")
    return model
