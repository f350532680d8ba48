"""χ²-ball distributionally robust proportions (Zhou et al. 2021; paper §3.1).

The worst-case mixture inside a χ² ball around the reference ratio p:

    q* = argmax_{q ∈ Δ, D(q, p) ≤ ρ}  Σ_i q_i·v_i,      D(q, p) = ½ Σ_i p_i (q_i/p_i − 1)²,

with v = ℓ − ℓ_R the excess loss. KKT gives q_i ∝ p_i·max(v_i − η, 0) for a threshold η that makes
the constraint tight, found by bisection (D is non-decreasing in η). All arithmetic is float64 numpy.
"""

from __future__ import annotations

import numpy as np

from drpruning.distributions import validate_proportions

_BISECTION_STEPS = 200


def half_chi_square(q: np.ndarray, p: np.ndarray) -> float:
    """D(q, p) = ½ Σ p_i (q_i/p_i − 1)², the ball's radius measure (∞ if q puts mass where p has none)."""
    q = np.asarray(q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    support = p > 0
    if np.any(q[~support] > 0):
        return float("inf")
    return float(0.5 * np.sum((q[support] - p[support]) ** 2 / p[support]))


def _as_distribution(p: np.ndarray | list[float], name: str) -> np.ndarray:
    p = validate_proportions(p, name=name)
    return p / p.sum()


def worst_case_proportions(excess: np.ndarray | list[float], reference_ratio: np.ndarray | list[float],
                           rho: float) -> np.ndarray:
    """The exact maximiser q* above (no clipping).

    Returns p when ρ ≤ 0 (degenerate ball), when there is one domain, or when every excess on p's
    support is ≤ 0 (every domain meets its reference: nothing to up-weight). When ρ is so
    large that the ball contains a distribution supported on the argmax set S of v, the maximum of
    the linear objective is max(v) and is attained by every such distribution; we return the one
    closest to p, q_i = p_i / p(S) on S (the limit η → max v), which lies in the ball iff
    ρ ≥ ½(1/p(S) − 1). Otherwise the constraint is tight and the maximiser is unique.
    Domains with p_i = 0 always get q_i = 0 (the divergence would be infinite).
    """
    p = _as_distribution(reference_ratio, "reference_ratio")
    v = np.asarray(excess, dtype=np.float64)
    if v.shape != p.shape:
        raise ValueError(f"excess has shape {v.shape}, reference_ratio has shape {p.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"excess losses must be finite, got {v.tolist()}")
    if not np.isfinite(rho):
        raise ValueError(f"rho must be finite, got {rho}")

    support = p > 0
    p_s, v_s = p[support], v[support]
    if rho <= 0 or p_s.size == 1 or v_s.max() <= 0:
        return p.copy()

    q = np.zeros_like(p)
    v_max = v_s.max()
    top = v_s == v_max
    top_mass = p_s[top].sum()
    if rho >= 0.5 * (1.0 / top_mass - 1.0):
        q_s = np.where(top, p_s / top_mass, 0.0)
        q[support] = q_s
        return q

    # Constraint tight. While η ≤ min v every weight is positive and D(η) = ½ Var_p(v) / (E_p v − η)²,
    # so the root has a closed form when it lies in that range.
    mean = float(np.dot(p_s, v_s))
    variance = float(np.dot(p_s, (v_s - mean) ** 2))
    eta_closed = mean - np.sqrt(variance / (2.0 * rho))
    if eta_closed <= v_s.min():
        weights = p_s * (v_s - eta_closed)
    else:
        weights = p_s * _bisect_threshold(v_s, p_s, rho, low=float(v_s.min()), high=float(v_max))
    q[support] = weights / weights.sum()
    return q


def _bisect_threshold(v: np.ndarray, p: np.ndarray, rho: float, low: float, high: float) -> np.ndarray:
    """max(v − η, 0) at the largest η found with D ≤ ρ, given D(low) < ρ < D(high⁻)."""

    def divergence(eta: float) -> tuple[float, np.ndarray]:
        excess = np.maximum(v - eta, 0.0)
        ratio = excess / np.dot(p, excess)  # q_i / p_i, finite for η < max v
        return 0.5 * float(np.dot(p, (ratio - 1.0) ** 2)), excess

    best = np.maximum(v - low, 0.0)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if not low < mid < high:
            break
        value, excess = divergence(mid)
        if value <= rho:
            low, best = mid, excess
        else:
            high = mid
    return best


def normalise_within_bounds(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The distribution y_i = clip(s·x_i, lower_i, upper_i) with Σ y = 1, for the scale s ≥ 0 that fits.

    "Clamp then renormalise" done so that the bounds still hold after renormalising: only the
    entries strictly inside their bounds are rescaled. Requires x ≥ 0, lower ≤ upper and
    Σ lower ≤ 1 ≤ Σ upper (over entries with x > 0; entries with x = 0 sit at their lower bound).
    """
    x = np.asarray(x, dtype=np.float64)
    lower = np.broadcast_to(np.asarray(lower, dtype=np.float64), x.shape)
    upper = np.broadcast_to(np.asarray(upper, dtype=np.float64), x.shape)
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"values to normalise must be finite and non-negative, got {x.tolist()}")
    if np.any(lower > upper) or np.any(lower < 0):
        raise ValueError("bounds must satisfy 0 ≤ lower ≤ upper")
    positive = x > 0
    reachable = lower[~positive].sum() + upper[positive].sum()
    if lower.sum() > 1.0 + 1e-12 or reachable < 1.0 - 1e-12:
        raise ValueError(f"no distribution within bounds: Σ lower = {lower.sum():.6g}, reachable max {reachable:.6g}")

    def total(scale: float) -> float:
        return float(np.clip(scale * x, lower, upper).sum())

    low, high = 0.0, float(np.max(upper[positive] / x[positive])) if positive.any() else 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if not low < mid < high:
            break
        if total(mid) < 1.0:
            low = mid
        else:
            high = mid
    # Solve exactly on the entries that are strictly inside their bounds at the bracketed scale.
    scale = 0.5 * (low + high)
    y = np.clip(scale * x, lower, upper)
    free = positive & (y > lower) & (y < upper)
    if free.any():
        y[free] = x[free] * (1.0 - y[~free].sum()) / x[free].sum()
        y = np.clip(y, lower, upper)
    return y


def dro_proportions(losses: np.ndarray | list[float], reference_losses: np.ndarray | list[float],
                    reference_ratio: np.ndarray | list[float], rho: float = 0.1,
                    clip: float | None = None) -> np.ndarray:
    """The sampling proportions of the `dro` policy: q* for v = ℓ − ℓ_R, truncated from below at `clip`
    (default min(p_R)) and renormalised, as the method specifies.

    After renormalising, an entry at the floor sits slightly below it (at clip / Σ max(q*, clip)). An exact
    floor would be wrong here: with uniform p_R the floor is 1/n, and an exact floor would pin q to p_R,
    switching DRO off. The truncation can move q slightly outside the χ² ball; q* itself is inside.
    """
    p = _as_distribution(reference_ratio, "reference_ratio")
    losses = np.asarray(losses, dtype=np.float64)
    reference_losses = np.asarray(reference_losses, dtype=np.float64)
    if losses.shape != p.shape or reference_losses.shape != p.shape:
        raise ValueError(f"losses {losses.shape}, reference_losses {reference_losses.shape} and "
                         f"reference_ratio {p.shape} must have the same shape")
    floor = float(p.min()) if clip is None else float(clip)
    if not 0.0 <= floor <= 1.0 / p.size:
        raise ValueError(f"clip must lie in [0, 1/num_domains = {1.0 / p.size:.6g}], got {floor}")
    q = np.maximum(worst_case_proportions(losses - reference_losses, p, rho), floor)
    return q / q.sum()
