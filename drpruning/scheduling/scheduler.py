"""`DataScheduler`: the Composer callback that runs a data policy every `update_interval` batches and
drives the domain mixer (SPEC §3; contracts in docs/architecture.md).

Every rank takes part in the collectives (per-domain train statistics, eval-metric syncs, the
broadcast); the policy itself runs on global rank 0 and its decision and new state are broadcast, so
every rank holds the identical proportions and the identical (checkpointable) policy state.

Use `eval_first: true` with `reference_losses: source` so that the source model's per-domain eval loss
is measured before the first step; without it the first periodic eval is used (and a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from drpruning.distributions import validate_proportions
from drpruning.errors import ConfigError
from drpruning.runs import (
    DATA_USAGE_FILE,
    SCHEDULE_FILE,
    append_jsonl,
    check_run_folder,
    keep_jsonl_lines,
    run_folder,
    start_run_in_folder,
    unwrap_model,
    write_json,
)
from drpruning.scheduling.policies import Observation, Policy, make_policy

log = logging.getLogger(__name__)

_EVAL_METRIC = "LanguageCrossEntropy"
_STATE_VERSION = 1


class DataScheduler(Callback):
    """Per-domain data proportions from `constant`, `sheared`, `dro` or `drpruning` (see `drpruning.scheduling.policies`).

    Args (the yaml keys of the `data_scheduler` callback):
        policy: `constant | sheared | dro | drpruning`.
        update_interval: batches between updates (with `loss_source: eval`, set `eval_interval` to match).
        loss_source: `eval` (per-domain eval CE, read at EVAL_AFTER_ALL) or `train_ema`
            (EMA of the per-domain train CE, updated every batch, read at BATCH_END).
        reference_losses: `{domain: loss}` for every domain, or `source` (the first eval's losses),
            or None (only for `constant`).
        initial_proportions: `{domain: p}` or a list in the mixer's domain order; default the mixer's.
        dynamic_reference_loss / dynamic_reference_ratio: default on for `drpruning`, off otherwise.
        rho, delta, ratio_bound, reference_loss_start, reference_ratio_start, min_points, max_history:
            DRO and DRPruning settings (`drpruning.scheduling.policies.DROPolicy`).
        ema: λ of the train-loss EMA.
        clamp_ratio_to_initial_range: after the drift, also keep p_R within [min p0, max p0] (reference
            code, on in the paper's runs; with uniform p0 it freezes p_R).
        eta, smoothing: `sheared` settings.
        clip_excess: `sheared` with Δ = max(ℓ − ℓ_ref, 0) (Sheared-LLaMA's paper) instead of the unclipped
            Δ its code used, which produced the DRPruning paper's ReSheared baseline (default).
        on_nan: `error` (raise, naming the domain and step) or `skip` (leave the proportions unchanged).
    """

    def __init__(self, policy: str = "drpruning", update_interval: int = 50, loss_source: str = "eval",
                 reference_losses: Mapping[str, float] | str | None = None,
                 initial_proportions: Mapping[str, float] | Sequence[float] | None = None,
                 dynamic_reference_loss: bool | None = None, dynamic_reference_ratio: bool | None = None,
                 rho: float = 0.1, ema: float = 0.1, delta: float = 0.1, ratio_bound: float = 2.0,
                 reference_loss_start: float = 0.2, reference_ratio_start: float = 0.4, eta: float = 1.0,
                 smoothing: float = 1e-4, min_points: int = 8, max_history: int = 64,
                 clip_excess: bool = False, clamp_ratio_to_initial_range: bool = True,
                 on_nan: str = "error") -> None:
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"update_interval must be an integer number of batches ≥ 1, got {update_interval!r}")
        if loss_source not in ("eval", "train_ema"):
            raise ConfigError(f"loss_source must be 'eval' or 'train_ema', got {loss_source!r}")
        if on_nan not in ("error", "skip"):
            raise ConfigError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
        if not 0.0 < ema <= 1.0:
            raise ConfigError(f"ema must lie in (0, 1], got {ema}")
        if isinstance(reference_losses, str) and reference_losses != "source":
            raise ConfigError(f"reference_losses must be a mapping domain → loss or 'source', got {reference_losses!r}")
        if reference_losses is not None and not isinstance(reference_losses, str | Mapping):
            raise ConfigError(f"reference_losses must be a mapping domain → loss or 'source', got {reference_losses!r}")
        self._policy_options: dict[str, Any] = dict(
            dynamic_reference_loss=dynamic_reference_loss, dynamic_reference_ratio=dynamic_reference_ratio, rho=rho,
            delta=delta, ratio_bound=ratio_bound, reference_loss_start=reference_loss_start,
            reference_ratio_start=reference_ratio_start, min_points=min_points, max_history=max_history, eta=eta,
            smoothing=smoothing, clip_excess=clip_excess, clamp_ratio_to_initial_range=clamp_ratio_to_initial_range)
        # Surface every policy-level config error now rather than after the model has loaded.
        probe = make_policy(policy, [1.0], **self._policy_options)
        if probe.needs_reference_losses and reference_losses is None:
            raise ConfigError(f"policy '{policy}' needs reference_losses: a mapping domain → loss, or 'source'")
        self.policy_name = policy
        self.update_interval = update_interval
        self.loss_source = loss_source
        self.reference_losses_config = reference_losses
        self.initial_proportions_config = initial_proportions
        self.ema = float(ema)
        self.on_nan = on_nan

        self.policy: Policy | None = None
        self.domains: list[str] = []
        self.max_batches = 0
        self.loss_ema: list[float | None] = []
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
        dataset = state.train_dataloader.dataset if state.train_dataloader is not None else None
        if dataset is None or not all(hasattr(dataset, name) for name in ("domains", "initial_proportions",
                                                                          "set_proportions", "proportions_at")):
            raise TypeError("DataScheduler needs the domain_mixture train loader (a DomainMixtureDataset)")
        model = unwrap_model(state.model)
        if not hasattr(model, "domain_stats"):
            raise TypeError("DataScheduler needs a model with per-domain statistics (drpruning_causal_lm)")
        if state.max_duration is None or state.max_duration.unit != TimeUnit.BATCH:
            raise ConfigError(f"DataScheduler needs max_duration in batches ('ba'), got {state.max_duration}")
        self.domains = [str(domain) for domain in dataset.domains]
        self.max_batches = int(state.max_duration.value)
        initial = self._resolve_initial_proportions(dataset)
        reference_losses = None
        if isinstance(self.reference_losses_config, Mapping):
            reference_losses = self._by_domain(self.reference_losses_config, "reference_losses")
        self.policy = make_policy(self.policy_name, initial, reference_losses, **self._policy_options)
        self.loss_ema = [None] * len(self.domains)
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

    def _resolve_initial_proportions(self, dataset: Any) -> np.ndarray:
        config = self.initial_proportions_config
        if config is None:
            return validate_proportions(dataset.initial_proportions, len(self.domains), "the mixer's initial_proportions")
        try:
            if isinstance(config, Mapping):
                return validate_proportions(self._by_domain(config, "initial_proportions"), name="initial_proportions")
            return validate_proportions(list(config), len(self.domains), "initial_proportions")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _by_domain(self, values: Mapping[str, float], key: str) -> np.ndarray:
        unknown = sorted(set(values) - set(self.domains))
        missing = [domain for domain in self.domains if domain not in values]
        if unknown:
            raise ConfigError(f"{key} names unknown domain(s) {unknown}; the mixer's domains are {self.domains}")
        if missing:
            raise ConfigError(f"{key} is missing domain(s) {missing}")
        return np.array([float(values[domain]) for domain in self.domains])

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
        loss_sums, token_counts = self._take_domain_stats(state)
        self.tokens = self.tokens + token_counts
        if self.loss_source == "train_ema":
            self._update_ema(loss_sums, token_counts, batch)
            if batch % self.update_interval == 0:
                if any(value is None for value in self.loss_ema):
                    unseen = [d for d, value in zip(self.domains, self.loss_ema, strict=True) if value is None]
                    log.info("DataScheduler: step %d waits for train losses of domain(s) %s", batch, unseen)
                    return
                self._update(state, logger, np.array(self.loss_ema, dtype=np.float64))

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        """`eval_first: true` runs a standalone eval before training: the source model's losses."""
        self._setup(state)
        self._maybe_measure_source(state)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._setup(state)
        self._maybe_measure_source(state)
        batch = int(state.timestamp.batch)
        if self.loss_source == "eval" and batch > 0 and batch % self.update_interval == 0:
            self._update(state, logger, self._read_eval_losses(state))

    def fit_end(self, state: State, logger: Logger) -> None:
        """Total data usage per domain (paper Table 3) to the loggers and `<run folder>/data_usage.json`."""
        self._setup(state)
        total = float(self.tokens.sum())
        fractions = self.tokens / total if total > 0 else np.zeros_like(self.tokens)
        metrics = {}
        for domain, tokens, fraction in zip(self.domains, self.tokens, fractions, strict=True):
            metrics[f"metrics/data/{domain}/total_tokens"] = float(tokens)
            metrics[f"metrics/data/{domain}/token_fraction"] = float(fraction)
        logger.log_metrics(metrics)
        write_json(run_folder(state) / DATA_USAGE_FILE, {
            "step": int(state.timestamp.batch),
            "total_tokens": total,
            "domains": {domain: {"tokens": float(tokens), "fraction": float(fraction)}
                        for domain, tokens, fraction in zip(self.domains, self.tokens, fractions, strict=True)},
        })
        if self.num_updates == 0:
            log.warning("DataScheduler made no update during this run: check update_interval (%d) against the "
                        "eval interval and max_duration", self.update_interval)

    # -------------------------------------------------------------------------------- measurements
    def _take_domain_stats(self, state: State) -> tuple[np.ndarray, np.ndarray]:
        model = unwrap_model(state.model)
        loss_sums, token_counts = model.domain_stats.take(len(self.domains))
        stacked = torch.stack([loss_sums.to(torch.float64), token_counts.to(torch.float64)])
        dist.all_reduce(stacked, reduce_operation="SUM")
        stacked = stacked.cpu().numpy()
        return stacked[0], stacked[1]

    def _update_ema(self, loss_sums: np.ndarray, token_counts: np.ndarray, batch: int) -> None:
        """EMA over the domains that had tokens this batch; the others keep their value."""
        for index in np.flatnonzero(token_counts > 0):
            mean = float(loss_sums[index] / token_counts[index])
            if not np.isfinite(mean):
                self._non_finite([self.domains[index]], batch, "train loss")
                continue
            previous = self.loss_ema[index]
            self.loss_ema[index] = mean if previous is None else (1.0 - self.ema) * previous + self.ema * mean

    def _read_eval_losses(self, state: State) -> np.ndarray:
        """Per-domain eval CE; `compute()` syncs across ranks, so every rank must call this."""
        losses = []
        for domain in self.domains:
            label = f"eval/{domain}"
            metrics = state.eval_metrics.get(label)
            if metrics is None or _EVAL_METRIC not in metrics:
                raise KeyError(f"DataScheduler needs the {_EVAL_METRIC} metric of evaluator '{label}'; found "
                               f"evaluators {sorted(state.eval_metrics)} (see the drpruning_domain_eval transform)")
            losses.append(float(metrics[_EVAL_METRIC].compute()))
        return np.array(losses, dtype=np.float64)

    def _maybe_measure_source(self, state: State) -> None:
        if self.reference_losses_config != "source" or self.source_measured:
            return
        assert self.policy is not None
        batch = int(state.timestamp.batch)
        losses = self._read_eval_losses(state)
        bad = [domain for domain, value in zip(self.domains, losses, strict=True) if not np.isfinite(value)]
        if bad:
            # Never skipped: a later eval of a half-pruned model would silently become the "source" reference.
            raise FloatingPointError(f"DataScheduler: non-finite source eval loss for domain(s) {bad} at step "
                                     f"{batch}; reference_losses: source needs finite losses of the source model")
        if batch > 0:
            log.warning("DataScheduler: reference losses taken from the eval at step %d, not from the source "
                        "model; set eval_first: true to measure the source model", batch)
        self.policy.set_reference_losses(losses)
        self.source_measured = True
        log.info("DataScheduler: source reference losses %s", dict(zip(self.domains, losses.tolist(), strict=True)))

    def _non_finite(self, domains: list[str], batch: int, what: str) -> None:
        message = f"DataScheduler: non-finite {what} for domain(s) {domains} at step {batch}"
        if self.on_nan == "error":
            raise FloatingPointError(message + " (set on_nan: skip to keep the current proportions instead)")
        log.warning("%s; skipped", message)

    # -------------------------------------------------------------------------------------- update
    def _update(self, state: State, logger: Logger, losses: np.ndarray) -> None:
        """Run the policy on rank 0, broadcast its decision and state, and hand q to the mixer everywhere."""
        assert self.policy is not None
        batch = int(state.timestamp.batch)
        if batch == self.last_update_batch:
            return
        bad = [domain for domain, value in zip(self.domains, losses, strict=True) if not np.isfinite(value)]
        if bad:
            self._non_finite(bad, batch, "loss")
            return
        if not self.policy.ready:
            log.info("DataScheduler: step %d waits for reference losses (reference_losses: source is measured "
                     "at the first eval)", batch)
            return

        payload: dict[str, Any] | None = None
        if dist.get_global_rank() == 0:
            payload = self._decide(state, losses, batch)
        shared = [payload]
        dist.broadcast_object_list(shared, src=0)
        payload = shared[0]
        assert payload is not None
        if "error" in payload:
            raise RuntimeError(f"DataScheduler: the policy failed on rank 0 at step {batch}: {payload['error']}")
        if dist.get_global_rank() != 0:
            self.policy.load_state_dict(payload["policy"])

        proportions = np.asarray(payload["proportions"], dtype=np.float64)
        dataset = state.train_dataloader.dataset
        effective_batch = int(dataset.set_proportions(proportions))
        # Log what the mixer holds (it renormalises), so schedule.jsonl is exactly what was sampled from.
        payload["proportions"] = [float(p) for p in dataset.proportions_at(effective_batch)]
        self.last_update_batch = batch
        self.num_updates += 1
        self._log(state, logger, payload, losses, batch, effective_batch)

    def _decide(self, state: State, losses: np.ndarray, batch: int) -> dict[str, Any]:
        """Rank 0: the policy's decision and new state as plain types (or the error, for the other ranks)."""
        assert self.policy is not None
        stats = unwrap_model(state.model).pruning_stats()
        observation = Observation(
            losses=losses, tokens=self.tokens.copy(), progress=batch / self.max_batches,
            params=None if stats is None else float(stats["expected_params"]),
            params_end=None if stats is None else float(stats["target_params"]))
        try:
            decision = self.policy.update(observation)
        except Exception as error:  # every rank must leave the broadcast; rank 0 re-raises below
            log.exception("DataScheduler: policy update failed at step %d", batch)
            return {"error": repr(error)}
        return {
            "proportions": decision.proportions.tolist(),
            "reference_losses": None if decision.reference_losses is None else decision.reference_losses.tolist(),
            "reference_ratio": decision.reference_ratio.tolist(),
            "expected_params": observation.params,
            "policy": self.policy.state_dict(),
        }

    def _log(self, state: State, logger: Logger, payload: dict[str, Any], losses: np.ndarray, batch: int,
             effective_batch: int) -> None:
        def by_domain(values: Sequence[float] | None) -> dict[str, float] | None:
            return None if values is None else dict(zip(self.domains, (float(v) for v in values), strict=True))

        record = {
            "step": batch,
            "effective_batch": effective_batch,
            "losses": by_domain(losses.tolist()),
            "reference_losses": by_domain(payload["reference_losses"]),
            "reference_ratio": by_domain(payload["reference_ratio"]),
            "proportions": by_domain(payload["proportions"]),
            "tokens": by_domain(self.tokens.tolist()),
            "expected_params": payload["expected_params"],
        }
        metrics = {}
        for key, name in (("losses", "loss"), ("reference_losses", "reference_loss"),
                          ("reference_ratio", "reference_ratio"), ("proportions", "proportion")):
            for domain, value in (record[key] or {}).items():
                metrics[f"metrics/data/{domain}/{name}"] = value
        logger.log_metrics(metrics)
        append_jsonl(run_folder(state) / SCHEDULE_FILE, record)

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "domains": list(self.domains),
            "policy": self.policy.state_dict(),
            "loss_ema": list(self.loss_ema),
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
        self.loss_ema = [None if value is None else float(value) for value in state["loss_ema"]]
        self.tokens = np.asarray(state["tokens"], dtype=np.float64)
        self.source_measured = bool(state["source_measured"])
        self.last_update_batch = int(state["last_update_batch"])
        self.num_updates = int(state["num_updates"])
