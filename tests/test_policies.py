"""Data policies: formulas by hand, reference-loss monotonicity, reference-ratio bounds, start fractions."""

import json

import numpy as np
import pytest

from drpruning.dro import dro_proportions
from drpruning.policies import ConstantPolicy, DROPolicy, Observation, ShearedPolicy, make_policy

P0 = np.array([0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02])
REFERENCE = np.array([1.96, 2.12, 0.75, 2.14, 1.76, 1.44, 1.61])
TOKENS_PER_UPDATE = 50 * 131_072
UPDATES = 64
# The scaling-law tests use fewer domains and updates: each update fits one curve per domain.
FIT_DOMAINS = 3
FIT_UPDATES = 15


def _loss_curve(step: int, updates: int = UPDATES, domains: int = P0.size) -> np.ndarray:
    """Per-domain losses that decrease like a power law; domain 2 lags well above its reference."""
    curve = REFERENCE[:domains] + 0.3 * (step / updates) ** -0.3
    curve[2] += 0.5
    return curve


def _observation(step: int, losses: np.ndarray | None = None, params: float | None = None,
                 updates: int = UPDATES, p0: np.ndarray = P0) -> Observation:
    return Observation(losses=_loss_curve(step, updates, p0.size) if losses is None else losses,
                       tokens=p0 * TOKENS_PER_UPDATE * step, progress=step / updates, params=params,
                       params_end=None if params is None else 1.3e9)


def _fit_p0() -> np.ndarray:
    return np.array([0.6, 0.3, 0.1])


def test_constant_is_constant() -> None:
    policy = make_policy("constant", P0)
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        decision = policy.update(_observation(step, losses=rng.uniform(1, 3, P0.size)))
        np.testing.assert_allclose(decision.proportions, P0, rtol=1e-15)
    assert isinstance(policy, ConstantPolicy)


def test_sheared_formula_by_hand() -> None:
    p0 = np.array([0.5, 0.3, 0.2])
    policy = make_policy("sheared", p0, [2.0, 2.0, 2.0], eta=1.0, smoothing=0.01)
    assert isinstance(policy, ShearedPolicy)
    first_losses = np.array([2.5, 1.5, 2.2])  # Δ = [0.5, 0 (clipped from −0.5), 0.2]
    expected = p0 * np.exp([0.5, 0.0, 0.2])
    expected = 0.99 * expected / expected.sum() + 0.01 / 3
    first = policy.update(Observation(first_losses, np.ones(3), 0.1)).proportions
    np.testing.assert_allclose(first, expected, rtol=1e-12)
    second_expected = expected * np.exp([0.0, 1.0, 0.0])
    second_expected = 0.99 * second_expected / second_expected.sum() + 0.01 / 3
    second = policy.update(Observation(np.array([1.0, 3.0, 1.0]), np.ones(3), 0.2)).proportions
    np.testing.assert_allclose(second, second_expected, rtol=1e-12)


def test_dro_keeps_reference_fixed() -> None:
    policy = make_policy("dro", P0, REFERENCE, rho=0.1)
    assert isinstance(policy, DROPolicy) and policy.name == "dro"
    for step in (10, 40, 64):
        decision = policy.update(_observation(step))
        np.testing.assert_array_equal(decision.reference_losses, REFERENCE)
        np.testing.assert_allclose(decision.reference_ratio, P0, rtol=1e-15)
        np.testing.assert_allclose(decision.proportions, dro_proportions(_loss_curve(step), REFERENCE, P0, 0.1))
    assert decision.proportions[2] > P0[2]  # the lagging domain is up-weighted


@pytest.mark.parametrize("params", [None, "shrinking"])
def test_reference_losses_never_rise_and_start_at_their_fraction(params: str | None) -> None:
    p0, start = _fit_p0(), REFERENCE[:FIT_DOMAINS] + 1.0  # a deliberately loose initial reference
    policy = make_policy("drpruning", p0, start, min_points=5, reference_loss_start=0.4)
    previous, lowered_at, observed = start, None, []
    rng = np.random.default_rng(1)
    for step in range(1, FIT_UPDATES + 1):
        losses = _loss_curve(step, FIT_UPDATES, FIT_DOMAINS) + rng.normal(0, 0.005, FIT_DOMAINS)
        observed.append(losses)
        size = None if params is None else 6.7e9 - 5.0e9 * min(step / (0.2 * FIT_UPDATES), 1.0)
        decision = policy.update(_observation(step, losses, size, FIT_UPDATES, p0))
        assert decision.reference_losses is not None
        assert np.all(decision.reference_losses <= previous)
        if step / FIT_UPDATES < 0.4:
            np.testing.assert_array_equal(decision.reference_losses, start)
        elif lowered_at is None and np.any(decision.reference_losses < previous):
            lowered_at = step
        previous = decision.reference_losses
    assert lowered_at == int(np.ceil(0.4 * FIT_UPDATES))  # after min_points (5) updates already
    assert np.all(previous <= np.min(observed, axis=0))


def test_reference_ratio_drifts_within_bounds_after_its_start() -> None:
    policy = make_policy("drpruning", P0, REFERENCE, dynamic_reference_loss=False, rho=0.5)
    losses = REFERENCE.copy()
    losses[6] += 1.0  # the smallest domain always has by far the largest excess
    ratios = []
    for step in range(1, UPDATES + 1):
        ratios.append(policy.update(_observation(step, losses=losses)).reference_ratio)
    ratios = np.array(ratios)
    start = int(np.ceil(0.4 * UPDATES))  # the ratio used at `start` is still p0; it moves after that update
    np.testing.assert_allclose(ratios[:start], np.tile(P0, (start, 1)), rtol=1e-15)
    assert not np.allclose(ratios[start], P0)
    assert np.all(ratios >= P0 / 2 - 1e-15) and np.all(ratios <= 2 * P0 + 1e-15)
    np.testing.assert_allclose(ratios.sum(axis=1), 1.0, atol=1e-12)
    assert ratios[-1][6] == pytest.approx(2 * P0[6], rel=1e-9)  # pinned at the upper bound


def test_drift_is_the_paper_update_when_bounds_are_slack() -> None:
    p0 = np.array([0.4, 0.35, 0.25])
    policy = make_policy("dro", p0, [1.0, 1.0, 1.0], dynamic_reference_ratio=True, reference_ratio_start=0.0,
                         delta=0.1, ratio_bound=10.0)
    decision = policy.update(Observation(np.array([1.2, 1.1, 1.0]), np.ones(3), 0.5))
    np.testing.assert_allclose(policy.reference_ratio, 0.1 * decision.proportions + 0.9 * p0, rtol=1e-12)


def test_ablation_switches() -> None:
    p0 = _fit_p0()
    no_ratio = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 1.0, dynamic_reference_ratio=False,
                           min_points=5)
    no_loss = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS], dynamic_reference_loss=False)
    for step in range(1, FIT_UPDATES + 1):
        ratio_decision = no_ratio.update(_observation(step, updates=FIT_UPDATES, p0=p0))
        loss_decision = no_loss.update(_observation(step, updates=FIT_UPDATES, p0=p0))
    np.testing.assert_allclose(ratio_decision.reference_ratio, p0, rtol=1e-15)
    assert np.any(ratio_decision.reference_losses < REFERENCE[:FIT_DOMAINS] + 1.0)  # its loss part is still on
    np.testing.assert_array_equal(loss_decision.reference_losses, REFERENCE[:FIT_DOMAINS])
    assert not np.allclose(loss_decision.reference_ratio, p0)  # its ratio part is still on
    assert no_loss.history == []


def test_history_is_capped_and_spread_over_the_run() -> None:
    policy = make_policy("drpruning", P0, REFERENCE, max_history=16, reference_loss_start=1.0)
    for step in range(1, UPDATES + 1):
        policy.update(_observation(step))
    progress = [entry["progress"] for entry in policy.history]
    assert len(progress) == 16
    assert progress[0] == 1 / UPDATES and progress[-1] == 1.0
    gaps = np.diff(np.log(progress))
    assert gaps.max() <= np.log(2) + 1e-12  # no hole wider than the first two updates' spacing
    assert gaps[-1] > np.log(UPDATES / (UPDATES - 1))  # late points were thinned, not just the oldest


def test_state_round_trip_continues_identically() -> None:
    p0 = _fit_p0()
    uninterrupted = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 0.5, min_points=5)
    for step in range(1, 6):  # stop after the first fits, before the reference ratio starts moving
        uninterrupted.update(_observation(step, updates=FIT_UPDATES, p0=p0))
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # plain types only
    resumed = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 0.5, min_points=5)
    resumed.load_state_dict(state)
    for step in range(6, FIT_UPDATES + 1):
        expected = uninterrupted.update(_observation(step, updates=FIT_UPDATES, p0=p0))
        actual = resumed.update(_observation(step, updates=FIT_UPDATES, p0=p0))
        np.testing.assert_array_equal(actual.proportions, expected.proportions)
        np.testing.assert_array_equal(actual.reference_losses, expected.reference_losses)
        np.testing.assert_array_equal(actual.reference_ratio, expected.reference_ratio)
    np.testing.assert_allclose(state["reference_ratio"], p0, rtol=1e-15)
    assert not np.allclose(expected.reference_ratio, p0)
    assert np.any(expected.reference_losses < state["reference_losses"])


def test_waits_without_reference_losses() -> None:
    policy = make_policy("dro", P0)
    assert not policy.ready
    with pytest.raises(RuntimeError, match="reference losses"):
        policy.update(_observation(1))
    policy.set_reference_losses(REFERENCE)
    assert policy.ready and make_policy("constant", P0).ready


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("doremi", P0)
    with pytest.raises(ValueError, match="apply to dro"):
        make_policy("sheared", P0, REFERENCE, dynamic_reference_loss=True)
    with pytest.raises(ValueError, match="sum to 1"):
        make_policy("constant", [0.5, 0.6])
    with pytest.raises(ValueError, match="ratio_bound"):
        make_policy("drpruning", P0, ratio_bound=0.5)
    with pytest.raises(ValueError, match="reference_loss_start"):
        make_policy("drpruning", P0, reference_loss_start=20)
    with pytest.raises(ValueError, match="checkpoint holds policy 'dro'"):
        make_policy("drpruning", P0, REFERENCE).load_state_dict(make_policy("dro", P0, REFERENCE).state_dict())
