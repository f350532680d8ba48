"""Mixture proportions over domains: the one check that a vector is a distribution, and the one reading of a
domain-keyed map into domain order.

Neutral ground for the mixer (which samples from proportions) and the scheduling policies (which compute
them), so neither imports the other's module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from drpruning.errors import ConfigError

SUM_TOLERANCE = 1e-6


def validate_proportions(values: Sequence[float] | np.ndarray, num_domains: int | None = None,
                         name: str = "proportions") -> np.ndarray:  # fmt: skip
    """A float64 copy of `values` if it is a distribution (finite, ≥ 0, sums to 1 within 1e-6).

    Not renormalised, so saved state round-trips bit for bit; callers that sample renormalise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ConfigError(f"{name} must be a non-empty list, got shape {array.shape}")
    if num_domains is not None and array.size != num_domains:
        raise ConfigError(f"{name} has {array.size} entries but there are {num_domains} domains")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ConfigError(f"{name} must be finite and non-negative, got {array.tolist()}")
    if abs(array.sum() - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{name} must sum to 1, got {array.sum():.8f}")
    return array


def in_domain_order(values: Mapping[str, float], domains: Sequence[str], name: str = "proportions") -> np.ndarray:
    """A `{domain: value}` map as a float64 vector in `domains` order; every domain exactly once."""
    unknown = sorted(set(values) - set(domains))
    if unknown:
        raise ConfigError(f"{name} names unknown domain(s) {unknown}; known domains: {list(domains)}")
    missing = [d for d in domains if d not in values]
    if missing:
        raise ConfigError(f"{name} misses domain(s) {missing}; give one value for each of {list(domains)}")
    return np.array([float(values[d]) for d in domains], dtype=np.float64)


def proportions_in_domain_order(
    proportions: Mapping[str, float] | Sequence[float] | np.ndarray, domains: Sequence[str]
) -> np.ndarray:
    """Proportions (a mapping by domain or a vector in `domains` order) as a float64 vector in `domains`
    order, normalised exactly; bad input raises `ConfigError`."""
    if isinstance(proportions, Mapping):
        values = in_domain_order(proportions, domains)
    else:
        values = np.asarray(proportions, dtype=np.float64).reshape(-1)
        if len(values) != len(domains):
            raise ConfigError(f"got {len(values)} proportions for {len(domains)} domains {list(domains)}")
    values = validate_proportions(values)
    return values / values.sum()
