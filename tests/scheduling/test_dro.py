"""χ²-ball DRO against a generic convex solver, plus the edge cases the closed forms must handle."""

import numpy as np
import pytest
from scipy.optimize import minimize

from drpruning.scheduling.dro import (
    dro_proportions,
    half_chi_square,
    normalise_within_bounds,
    worst_case_proportions,
)

REDPAJAMA_P0 = np.array([0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15])


def _slsqp_maximum(v: np.ndarray, p: np.ndarray, rho: float) -> float:
    """Best objective SLSQP reaches on max q·v s.t. q ∈ Δ, ½χ²(q, p) ≤ ρ (from two starts)."""
    constraints = [{"type": "eq", "fun": lambda q: q.sum() - 1.0, "jac": lambda q: np.ones_like(q)},
                   {"type": "ineq", "fun": lambda q: rho - 0.5 * np.sum((q - p) ** 2 / p),
                    "jac": lambda q: -(q - p) / p}]
    best = -np.inf
    for start in (p, np.full_like(p, 1.0 / p.size)):
        result = minimize(lambda q: -q @ v, start, jac=lambda q: -v, method="SLSQP", bounds=[(0.0, 1.0)] * p.size,
                          constraints=constraints, options={"ftol": 1e-14, "maxiter": 500})
        feasible = half_chi_square(result.x, p) <= rho + 1e-7 and abs(result.x.sum() - 1) < 1e-8 and result.x.min() > -1e-9
        if feasible:
            best = max(best, float(result.x @ v))
    assert np.isfinite(best), "SLSQP found no feasible point"
    return best


@pytest.mark.parametrize("seed", range(40))
def test_matches_generic_solver(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    p = rng.dirichlet(np.ones(n))
    v = rng.normal(size=n) + 0.5
    v[rng.integers(n)] = abs(v.max()) + 0.1  # at least one positive excess, so the maximiser is not p by rule
    rho = float(rng.choice([0.005, 0.05, 0.1, 0.5, 2.0]))
    q = worst_case_proportions(v, p, rho)
    assert half_chi_square(q, p) <= rho + 1e-6
    assert q.sum() == pytest.approx(1.0, abs=1e-12) and q.min() >= 0
    reference = _slsqp_maximum(v, p, rho)
    assert q @ v >= reference - 1e-6 * max(1.0, abs(reference))


def test_reference_implementation_example() -> None:
    """The notes' sanity check (§2.3): RedPajama p0, ρ = 0.1, no floor."""
    v = np.array([0.10, 0.0, 0.20, 0.05, 0.05, 0.02, 0.30])
    q = worst_case_proportions(v, REDPAJAMA_P0, 0.1)
    np.testing.assert_allclose(q, [0.579, 0.014, 0.064, 0.012, 0.027, 0.011, 0.295], atol=1e-3)
    assert half_chi_square(q, REDPAJAMA_P0) == pytest.approx(0.1, abs=1e-9)


def test_closed_form_branch_is_tight() -> None:
    """Small ρ: every weight stays positive and the constraint holds with equality."""
    p = np.array([0.5, 0.3, 0.2])
    v = np.array([0.3, 0.2, 0.1])
    q = worst_case_proportions(v, p, 1e-3)
    assert np.all(q > 0)
    assert half_chi_square(q, p) == pytest.approx(1e-3, rel=1e-9)
    assert q[0] > p[0] and q[2] < p[2]


def test_truncated_from_below_then_renormalised() -> None:
    losses = np.array([2.1, 1.0, 2.2, 1.65, 1.8, 1.46, 2.42])
    reference = np.array([2.0, 1.0, 2.0, 1.6, 1.75, 1.44, 2.12])
    q = dro_proportions(losses, reference, REDPAJAMA_P0, rho=0.1)
    unclipped = worst_case_proportions(losses - reference, REDPAJAMA_P0, 0.1)
    floor = REDPAJAMA_P0.min()
    assert (unclipped < floor).any(), "the example must exercise the floor"
    truncated = np.maximum(unclipped, floor)
    np.testing.assert_allclose(q, truncated / truncated.sum(), rtol=1e-12)
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    assert q.min() >= floor / truncated.sum() - 1e-15


def test_uniform_reference_ratio_still_moves_toward_the_hardest_domain() -> None:
    """With uniform p_R the floor is 1/n; DRO must still up-weight the domain furthest above its reference."""
    p = np.full(5, 0.2)
    q = dro_proportions([9.0, 8.0, 8.1, 8.2, 8.0], [3.0, 4.0, 3.0, 4.0, 4.0], p, rho=0.1)
    assert q[0] > 0.25 and q.argmax() == 0 and q.sum() == pytest.approx(1.0)


def test_explicit_clip_and_invalid_clip() -> None:
    q = dro_proportions([3.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3], rho=5.0, clip=0.1)
    np.testing.assert_allclose(q, np.array([1.0, 0.1, 0.1]) / 1.2, atol=1e-12)
    with pytest.raises(ValueError, match="clip"):
        dro_proportions([3.0, 1.0], [1.0, 1.0], [0.5, 0.5], clip=0.6)


def test_all_excess_non_positive_returns_reference() -> None:
    p = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(worst_case_proportions([-0.1, 0.0, -0.5], p, 0.1), p, rtol=1e-15)
    np.testing.assert_allclose(dro_proportions([1.0, 2.0, 3.0], [1.5, 2.0, 3.2], p), p)


def test_equal_excess_and_zero_radius_return_reference() -> None:
    p = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(worst_case_proportions([0.2, 0.2, 0.2], p, 0.1), p)
    np.testing.assert_allclose(worst_case_proportions([0.5, 0.1, 0.2], p, 0.0), p, rtol=1e-15)


def test_one_domain() -> None:
    np.testing.assert_array_equal(worst_case_proportions([0.7], [1.0], 0.1), [1.0])
    np.testing.assert_array_equal(dro_proportions([2.0], [1.0], [1.0]), [1.0])


def test_large_radius_puts_mass_on_the_argmax_in_proportion_to_p() -> None:
    p = np.array([0.5, 0.2, 0.3])
    v = np.array([0.1, 0.4, 0.4])  # tie for the maximum
    # ½(1/p(S) − 1) = ½(1/0.5 − 1) = 0.5 is the smallest radius containing the argmax face.
    q = worst_case_proportions(v, p, 0.5)
    np.testing.assert_allclose(q, [0.0, 0.4, 0.6], atol=1e-15)
    np.testing.assert_allclose(worst_case_proportions(v, p, 1e6), [0.0, 0.4, 0.6], atol=1e-15)
    # Just inside that radius the constraint is tight and domain 0 still gets a little.
    q_inside = worst_case_proportions(v, p, 0.49)
    assert 0 < q_inside[0] < 0.05
    assert half_chi_square(q_inside, p) == pytest.approx(0.49, rel=1e-9)
    assert q_inside[1] / q_inside[2] == pytest.approx(0.2 / 0.3, rel=1e-9)


def test_single_argmax_and_huge_radius() -> None:
    q = worst_case_proportions([0.1, 0.9, 0.3], [0.2, 0.3, 0.5], 1e9)
    np.testing.assert_array_equal(q, [0.0, 1.0, 0.0])


def test_tiny_and_zero_proportions() -> None:
    p = np.array([1e-12, 0.5 - 1e-12, 0.5])
    v = np.array([5.0, 0.1, 0.2])
    for rho in (1e-6, 0.1, 10.0, 1e13):
        q = worst_case_proportions(v, p, rho)
        assert np.all(np.isfinite(q)) and q.sum() == pytest.approx(1.0, abs=1e-12)
        assert half_chi_square(q, p) <= rho * (1 + 1e-9)
    q = worst_case_proportions([5.0, 0.1, 0.2], [0.0, 0.5, 0.5], 10.0)
    assert q[0] == 0.0 and q[2] == 1.0
    floored = dro_proportions([6.0, 1.0, 1.0], [1.0, 1.0, 1.0], p, rho=1e13)
    assert np.all(np.isfinite(floored)) and floored.min() >= 1e-12 * (1 - 1e-9)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="finite"):
        worst_case_proportions([np.nan, 0.1], [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="sum to 1"):
        worst_case_proportions([0.2, 0.1], [0.5, 0.6], 0.1)
    with pytest.raises(ValueError, match="shape"):
        worst_case_proportions([0.2, 0.1, 0.3], [0.5, 0.5], 0.1)


def test_normalise_within_bounds_keeps_bounds_exactly() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 10))
        p0 = rng.dirichlet(np.ones(n))
        x = rng.dirichlet(np.ones(n) * 0.3) * rng.uniform(0.1, 10)
        y = normalise_within_bounds(x, p0 / 2, np.minimum(2 * p0, 1.0))
        assert y.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(y >= p0 / 2 - 1e-15) and np.all(y <= 2 * p0 + 1e-15)
        inside = (y > p0 / 2 + 1e-12) & (y < 2 * p0 - 1e-12)
        if inside.sum() >= 2:  # free entries share one scale
            ratios = y[inside] / x[inside]
            np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    with pytest.raises(ValueError, match="no distribution"):
        normalise_within_bounds([1.0, 1.0], [0.6, 0.6], [1.0, 1.0])
