"""Per-domain scaling-law fit that predicts the end-of-training loss (paper §3.2).

    ℓ̂(P, T) = A / (P^α · T^β) + E        (pruning: P = expected remaining parameters)
    ℓ̂(T)    = A / T^β + E                (continued pretraining: P is None or constant)

Fitted on (P, T, ℓ) history with the Huber loss (δ = 1e-3) and L-BFGS-B from a small grid of
initialisations, as Hoffmann et al. (2022): every start gets a few iterations, the three best are
refined to convergence (one update for 8 domains stays well under 0.5 s on one core). Parameters are (log A, log E, α, β) so A, E > 0, and the
inputs are divided by their geometric mean: the fit is then independent of units and the centred
log-features decorrelate log A from the exponents, which cuts the L-BFGS iterations several-fold. The prediction used downstream is the mean over the best three fits,
each clamped to [0, lowest observed loss] so the reference is never above an observed point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
_BEST_FITS = 3
_IRREDUCIBLE_FRACTIONS = (0.5, 0.9)  # initial E as a fraction of the lowest observed loss
_TOKEN_EXPONENTS = (0.2, 0.6)
_PARAM_EXPONENTS = (0.3, 1.0)
_EXPONENT_BOUNDS = (0.0, 3.0)
_LOG_AMPLITUDE_BOUNDS = (-30.0, 30.0)
_CONSTANT_RELATIVE_RANGE = 1e-9
_SCREEN_ITERATIONS = 10
_REFINE_ITERATIONS = 200


@dataclass(frozen=True)
class ScalingLawFit:
    """One fitted curve, in the caller's units (A is rescaled back from the normalised inputs)."""

    amplitude: float  # A
    irreducible: float  # E
    params_exponent: float  # α (0 for the A/T^β + E form)
    tokens_exponent: float  # β
    objective: float  # mean Huber loss / δ² at the optimum
    uses_params: bool

    def predict(self, tokens: float | np.ndarray, params: float | np.ndarray | None = None) -> np.ndarray:
        """ℓ̂ at the given tokens (and parameters, for the pruning form)."""
        log_term = np.log(self.amplitude) - self.tokens_exponent * np.log(np.asarray(tokens, dtype=np.float64))
        if self.uses_params:
            if params is None:
                raise ValueError("this fit depends on the parameter count: pass params")
            log_term = log_term - self.params_exponent * np.log(np.asarray(params, dtype=np.float64))
        return np.exp(log_term) + self.irreducible


def _huber_objective(theta: np.ndarray, features: np.ndarray, losses: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber(ℓ̂ − ℓ)/δ² and its gradient; θ = (log A, log E, exponents...), features = −log x.

    Dividing by δ² keeps the objective O(1) so L-BFGS-B's relative stopping tests are meaningful.
    """
    log_a, log_e, exponents = theta[0], theta[1], theta[2:]
    # Elementwise products, not `@`: BLAS gemv threads on tiny arrays and crawls on a busy machine.
    power_term = np.exp(log_a + (features * exponents).sum(axis=1))
    irreducible = np.exp(log_e)
    residual = power_term + irreducible - losses
    clipped = np.clip(residual, -delta, delta)
    # Huber(r) = c·(r − c/2) with c = clip(r, −δ, δ); its derivative is c.
    value = float((clipped * (residual - 0.5 * clipped)).sum()) / (delta**2 * losses.size)
    slope = clipped / (delta**2 * losses.size)
    weighted = slope * power_term
    gradient = np.concatenate(([weighted.sum(), slope.sum() * irreducible], (weighted[:, None] * features).sum(axis=0)))
    return value, gradient


def _initial_points(features: np.ndarray, losses: np.ndarray) -> list[np.ndarray]:
    """Grid over (E, exponents); log A for each is the least-squares intercept of log(ℓ − E)."""
    lowest = float(losses.min())
    exponent_grids = [_TOKEN_EXPONENTS] if features.shape[1] == 1 else [_TOKEN_EXPONENTS, _PARAM_EXPONENTS]
    starts = []
    for fraction in _IRREDUCIBLE_FRACTIONS:
        irreducible = fraction * lowest
        log_excess = np.log(np.maximum(losses - irreducible, 1e-3 * lowest))
        for exponents in itertools.product(*exponent_grids):
            exponents = np.asarray(exponents, dtype=np.float64)
            log_a = float(np.mean(log_excess - (features * exponents).sum(axis=1)))
            log_a = float(np.clip(log_a, *_LOG_AMPLITUDE_BOUNDS))
            starts.append(np.concatenate(([log_a, np.log(irreducible)], exponents)))
    return starts


def fit_scaling_law(losses: np.ndarray | list[float], tokens: np.ndarray | list[float],
                    params: np.ndarray | list[float] | None = None, *, huber_delta: float = HUBER_DELTA,
                    best: int = _BEST_FITS) -> list[ScalingLawFit]:
    """Fit from every grid start and return the `best` fits with the lowest objective, best first.

    Points must be finite with tokens > 0 (and params > 0). `params` that are None or constant
    select the A/T^β + E form. Returns an empty list only if every start failed numerically.
    """
    losses = np.asarray(losses, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if losses.ndim != 1 or tokens.shape != losses.shape or losses.size < 2:
        raise ValueError(f"need matching 1-D losses and tokens with ≥ 2 points, got {losses.shape}, {tokens.shape}")
    if not (np.all(np.isfinite(losses)) and np.all(np.isfinite(tokens)) and np.all(tokens > 0)):
        raise ValueError("losses and tokens must be finite and tokens positive")
    if np.any(losses <= 0):
        raise ValueError("losses must be positive")
    tokens_scale = float(np.exp(np.log(tokens).mean()))
    columns = [-np.log(tokens / tokens_scale)]
    uses_params = params is not None and _varies(np.asarray(params, dtype=np.float64))
    params_scale = 1.0
    if uses_params:
        params = np.asarray(params, dtype=np.float64)
        if params.shape != losses.shape or not (np.all(np.isfinite(params)) and np.all(params > 0)):
            raise ValueError("params must be finite, positive and match the losses")
        params_scale = float(np.exp(np.log(params).mean()))
        columns.append(-np.log(params / params_scale))
    features = np.stack(columns, axis=1)

    lowest, highest = float(losses.min()), float(losses.max())
    bounds = [_LOG_AMPLITUDE_BOUNDS, (np.log(1e-6 * lowest), np.log(highest))] + [_EXPONENT_BOUNDS] * features.shape[1]
    # Screen every start with a few iterations, then refine the most promising ones to convergence.
    # One BLAS thread: L-BFGS-B's tiny vector ops are 10-100x slower when BLAS threads compete for cores.
    with threadpool_limits(limits=1, user_api="blas"):
        screened = []
        for start in _initial_points(features, losses):
            start[1] = np.clip(start[1], *bounds[1])
            result = _minimise(start, features, losses, huber_delta, bounds, _SCREEN_ITERATIONS)
            if result is not None:
                screened.append(result)
        screened.sort(key=lambda item: item[0])
        results = [_minimise(theta, features, losses, huber_delta, bounds, _REFINE_ITERATIONS)
                   for _, theta in screened[:best]]
    results = sorted((result for result in results if result is not None), key=lambda item: item[0])

    fits = []
    for objective, theta in results:
        tokens_exponent = float(theta[2])
        params_exponent = float(theta[3]) if uses_params else 0.0
        # Undo the normalisation: A' / ((P/Ps)^α (T/Ts)^β) = A' Ps^α Ts^β / (P^α T^β).
        amplitude = float(np.exp(theta[0] + tokens_exponent * np.log(tokens_scale)
                                 + params_exponent * np.log(params_scale)))
        fits.append(ScalingLawFit(amplitude=amplitude, irreducible=float(np.exp(theta[1])),
                                  params_exponent=params_exponent, tokens_exponent=tokens_exponent,
                                  objective=objective, uses_params=uses_params))
    return fits


def _minimise(start: np.ndarray, features: np.ndarray, losses: np.ndarray, delta: float,
              bounds: list[tuple[float, float]], max_iterations: int) -> tuple[float, np.ndarray] | None:
    """L-BFGS-B from `start`; (objective, θ), or None if it diverged to non-finite values."""
    result = minimize(_huber_objective, start, args=(features, losses, delta), jac=True, method="L-BFGS-B",
                      bounds=bounds, options={"maxiter": max_iterations, "ftol": 1e-10, "gtol": 1e-8})
    if np.all(np.isfinite(result.x)) and np.isfinite(result.fun):
        return float(result.fun), result.x
    return None


def _varies(values: np.ndarray) -> bool:
    return bool(values.max() - values.min() > _CONSTANT_RELATIVE_RANGE * abs(values.max()))


def predict_final_loss(losses: np.ndarray | list[float], tokens: np.ndarray | list[float],
                       params: np.ndarray | list[float] | None, tokens_end: float,
                       params_end: float | None, *, min_points: int = 8,
                       huber_delta: float = HUBER_DELTA) -> float | None:
    """Predicted loss at (params_end, tokens_end), or None with fewer than `min_points` usable points.

    Usable points have a finite loss and tokens > 0. The result is the mean of the best three fits'
    predictions, each clamped to [0, lowest observed loss].
    """
    losses = np.asarray(losses, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    usable = np.isfinite(losses) & np.isfinite(tokens) & (tokens > 0) & (losses > 0)
    if params is not None:
        params = np.asarray(params, dtype=np.float64)
        usable &= np.isfinite(params) & (params > 0)
    if int(usable.sum()) < min_points:
        return None
    fits = fit_scaling_law(losses[usable], tokens[usable], None if params is None else params[usable],
                           huber_delta=huber_delta)
    if not fits:
        return None
    if fits[0].uses_params and params_end is None:
        raise ValueError("the parameter count varies over the history: params_end is required")
    lowest = float(losses[usable].min())
    predictions = [float(np.clip(fit.predict(tokens_end, params_end), 0.0, lowest)) for fit in fits]
    return float(np.mean(predictions))
