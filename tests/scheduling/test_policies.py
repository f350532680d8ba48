"""Data policies: formulas by hand, reference-loss monotonicity, reference-ratio bounds, start fractions."""

import json

import numpy as np
import pytest

from drpruning.scheduling.dro import dro_proportions
from drpruning.scheduling.policies import (
    ConstantPolicy,
    DROPolicy,
    Observation,
    PolicySettings,
    ShearedPolicy,
    drift_reference_ratio,
    make_policy,
)

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


def test_sheared_clipped_formula_by_hand() -> None:
    """Sheared-LLaMA's paper (Algorithm 1): Δ = max(ℓ − ℓ_ref, 0)."""
    p0 = np.array([0.5, 0.3, 0.2])
    policy = make_policy("sheared", p0, [2.0, 2.0, 2.0],
                         PolicySettings(eta=1.0, smoothing=0.01, clip_excess=True))
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


def test_sheared_default_is_the_unclipped_code_that_ran_the_papers_baseline() -> None:
    """Sheared-LLaMA's code (η = 1, c = 1e-4): a domain below its reference is pushed down."""
    p0 = np.array([0.5, 0.3, 0.2])
    policy = make_policy("sheared", p0, [2.0, 2.0, 2.0])
    losses = np.array([2.5, 1.5, 2.2])  # Δ = [0.5, −0.5, 0.2], not clipped
    expected = p0 * np.exp([0.5, -0.5, 0.2])
    expected = (1 - 1e-4) * expected / expected.sum() + 1e-4 / 3
    actual = policy.update(Observation(losses, np.ones(3), 0.1)).proportions
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    clipped = make_policy("sheared", p0, [2.0, 2.0, 2.0], PolicySettings(clip_excess=True)).update(
        Observation(losses, np.ones(3), 0.1)).proportions
    assert actual[1] < clipped[1]  # the clipped form only freezes the domain below its reference


def test_dro_keeps_reference_fixed() -> None:
    policy = make_policy("dro", P0, REFERENCE, PolicySettings(rho=0.1))
    assert isinstance(policy, DROPolicy) and policy.name == "dro"
    for step in (10, 40, 64):
        decision = policy.update(_observation(step))
        np.testing.assert_array_equal(decision.reference_losses, REFERENCE)
        np.testing.assert_allclose(decision.reference_ratio, P0, rtol=1e-15)
        np.testing.assert_allclose(decision.proportions, dro_proportions(_loss_curve(step), REFERENCE, P0, 0.1))
    assert decision.proportions[2] > P0[2]  # the lagging domain is up-weighted


def _fit_run(start: np.ndarray, params: str | None, reference_loss_start: float = 0.4):
    """Run `drpruning` on noisy power-law losses; yields (step, decision, losses observed so far)."""
    p0 = _fit_p0()
    policy = make_policy("drpruning", p0, start,
                         PolicySettings(min_points=5, reference_loss_start=reference_loss_start))
    rng = np.random.default_rng(1)
    observed = []
    for step in range(1, FIT_UPDATES + 1):
        losses = _loss_curve(step, FIT_UPDATES, FIT_DOMAINS) + rng.normal(0, 0.005, FIT_DOMAINS)
        observed.append(losses)
        size = None if params is None else 6.7e9 - 5.0e9 * min(step / (0.2 * FIT_UPDATES), 1.0)
        yield step, policy.update(_observation(step, losses, size, FIT_UPDATES, p0)), np.array(observed)


@pytest.mark.parametrize("params", [None, "shrinking"])
def test_reference_below_the_true_end_loss_rises_at_the_first_fit_then_never_again(params: str | None) -> None:
    """SPEC §3 (reference code): the first fit replaces ℓ_R, later fits can only lower it."""
    end_loss = _loss_curve(FIT_UPDATES, FIT_UPDATES, FIT_DOMAINS)
    start = end_loss - 0.5  # e.g. `reference_losses: source`: far below anything the pruned model reaches
    first_fit = int(np.ceil(0.4 * FIT_UPDATES))
    previous = start
    for step, decision, observed in _fit_run(start, params):
        assert decision.reference_losses is not None
        if step < first_fit:
            np.testing.assert_array_equal(decision.reference_losses, start)
        elif step == first_fit:
            assert np.all(decision.reference_losses > start + 0.3)  # rose toward the predicted end loss
        else:
            assert np.all(decision.reference_losses <= previous)  # never rises after the first fit
        assert np.all(decision.reference_losses <= observed.min(axis=0) + 1e-12) or step < first_fit
        previous = decision.reference_losses
    assert np.all(np.abs(previous - end_loss) < 0.1)  # ends near the true end-of-training loss


def test_loose_reference_falls_at_the_first_fit_and_never_rises() -> None:
    start = REFERENCE[:FIT_DOMAINS] + 1.0  # above every observed loss
    previous, first_fit = start, int(np.ceil(0.4 * FIT_UPDATES))
    for step, decision, observed in _fit_run(start, None):
        assert np.all(decision.reference_losses <= previous)
        if step < first_fit:
            np.testing.assert_array_equal(decision.reference_losses, start)
        else:
            assert np.all(decision.reference_losses <= observed.min(axis=0))
        previous = decision.reference_losses


def test_first_fit_is_per_domain() -> None:
    """A domain whose fit is not possible yet keeps its configured value; its first fit still replaces it."""
    p0 = _fit_p0()
    policy = make_policy("drpruning", p0, [0.1, 0.1, 0.1], PolicySettings(min_points=5, reference_loss_start=0.0))
    for step in range(1, 8):
        tokens = p0 * TOKENS_PER_UPDATE * step
        if step < 3:
            tokens[2] = 0.0  # domain 2 not sampled yet: its first points are unusable, so it fits two updates later
        losses = _loss_curve(step, FIT_UPDATES, FIT_DOMAINS)
        policy.update(Observation(losses, tokens, step / FIT_UPDATES))
        if step == 5:
            assert policy.fitted.tolist() == [True, True, False]
            assert policy.reference_losses[2] == 0.1
    assert policy.fitted.all() and policy.reference_losses[2] > 0.1  # rose from 0.1 at its own first fit


def test_reference_ratio_drifts_within_bounds_after_its_start() -> None:
    policy = make_policy("drpruning", P0, REFERENCE, PolicySettings(dynamic_reference_loss=False, rho=0.5))
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
    policy = make_policy("dro", p0, [1.0, 1.0, 1.0], PolicySettings(
        dynamic_reference_ratio=True, reference_ratio_start=0.0, delta=0.1, ratio_bound=10.0,
        clamp_ratio_to_initial_range=False))
    decision = policy.update(Observation(np.array([1.2, 1.1, 1.0]), np.ones(3), 0.5))
    np.testing.assert_allclose(policy.reference_ratio, 0.1 * decision.proportions + 0.9 * p0, rtol=1e-12)


MULTILINGUAL_P0 = np.array([0.27704, 0.18472, 0.12974, 0.10378, 0.09090, 0.08885, 0.06674, 0.05823])  # en..th


def test_second_clamp_keeps_every_domain_within_the_initial_range() -> None:
    """Reference code: after [p0/n, n·p0], each domain is also kept in [min p0, max p0] (paper Table 7)."""
    p0 = MULTILINGUAL_P0 / MULTILINGUAL_P0.sum()
    rng = np.random.default_rng(3)
    ratio = p0.copy()
    for _ in range(200):  # any drift: adversarial q's, all mass on one or two domains
        q = rng.dirichlet(np.full(8, 0.05))
        ratio = drift_reference_ratio(ratio, q, p0, delta=0.5, ratio_bound=2.0)
        assert np.all(ratio >= p0.min() * (1 - 1e-12)) and np.all(ratio <= p0.max() * (1 + 1e-12))
        assert ratio.sum() == pytest.approx(1.0, abs=1e-12)
    assert ratio[-1] >= 0.0582  # th never falls below its initial 5.82 %
    assert np.all(drift_reference_ratio(p0, np.eye(8)[0], p0, 0.9, 2.0) <= p0.max() * (1 + 1e-12))


def test_second_clamp_by_hand() -> None:
    p0 = np.array([0.5, 0.3, 0.2])
    q = np.array([0.0, 0.0, 1.0])  # all weight to the smallest domain
    # 0.5·q + 0.5·p0 = [0.25, 0.15, 0.6]; domain 2 is capped at 2·p0 = 0.4, the others share 0.6 pro rata.
    np.testing.assert_allclose(drift_reference_ratio(p0, q, p0, 0.5, 2.0, clamp_to_initial_range=False),
                               [0.375, 0.225, 0.4], rtol=1e-12)
    # The second clamp to [min p0, max p0] = [0.2, 0.5] changes nothing: every entry is already inside.
    np.testing.assert_allclose(drift_reference_ratio(p0, q, p0, 0.5, 2.0), [0.375, 0.225, 0.4], rtol=1e-12)
    # A drift that pushes the largest domain past max p0 = 0.5 is capped there (and 0.1 raised to 0.2).
    q = np.array([1.0, 0.0, 0.0])
    unclamped = drift_reference_ratio(p0, q, p0, 0.5, 2.0, clamp_to_initial_range=False)
    np.testing.assert_allclose(unclamped, [0.75, 0.15, 0.1], rtol=1e-12)
    np.testing.assert_allclose(drift_reference_ratio(p0, q, p0, 0.5, 2.0), [0.5, 0.3, 0.2], rtol=1e-12)


def test_uniform_p0_with_the_second_clamp_freezes_the_ratio() -> None:
    p0 = np.full(5, 0.2)
    np.testing.assert_allclose(drift_reference_ratio(p0, np.eye(5)[0], p0, 0.5, 2.0), p0, rtol=1e-12)
    assert drift_reference_ratio(p0, np.eye(5)[0], p0, 0.5, 2.0, clamp_to_initial_range=False)[0] > 0.2


def test_ablation_switches() -> None:
    p0 = _fit_p0()
    no_ratio = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 1.0,
                           PolicySettings(dynamic_reference_ratio=False, min_points=5))
    no_loss = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS], PolicySettings(dynamic_reference_loss=False))
    for step in range(1, FIT_UPDATES + 1):
        ratio_decision = no_ratio.update(_observation(step, updates=FIT_UPDATES, p0=p0))
        loss_decision = no_loss.update(_observation(step, updates=FIT_UPDATES, p0=p0))
    np.testing.assert_allclose(ratio_decision.reference_ratio, p0, rtol=1e-15)
    assert np.any(ratio_decision.reference_losses < REFERENCE[:FIT_DOMAINS] + 1.0)  # its loss part is still on
    np.testing.assert_array_equal(loss_decision.reference_losses, REFERENCE[:FIT_DOMAINS])
    assert not np.allclose(loss_decision.reference_ratio, p0)  # its ratio part is still on
    assert no_loss.history == []


def test_history_is_capped_and_spread_over_the_run() -> None:
    policy = make_policy("drpruning", P0, REFERENCE, PolicySettings(max_history=16, reference_loss_start=1.0))
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
    uninterrupted = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 0.5, PolicySettings(min_points=5))
    for step in range(1, 6):  # stop after the first fits, before the reference ratio starts moving
        uninterrupted.update(_observation(step, updates=FIT_UPDATES, p0=p0))
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # plain types only
    resumed = make_policy("drpruning", p0, REFERENCE[:FIT_DOMAINS] + 0.5, PolicySettings(min_points=5))
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
        make_policy("sheared", P0, REFERENCE, PolicySettings(dynamic_reference_loss=True))
    with pytest.raises(ValueError, match="sum to 1"):
        make_policy("constant", [0.5, 0.6])
    with pytest.raises(ValueError, match="ratio_bound"):
        make_policy("drpruning", P0, settings=PolicySettings(ratio_bound=0.5))
    with pytest.raises(ValueError, match="reference_loss_start"):
        make_policy("drpruning", P0, settings=PolicySettings(reference_loss_start=20))
    with pytest.raises(ValueError, match="checkpoint holds policy 'dro'"):
        make_policy("drpruning", P0, REFERENCE).load_state_dict(make_policy("dro", P0, REFERENCE).state_dict())


def test_unknown_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown policy option\(s\) \['max_histroy'\]; valid options: .*max_history"):
        PolicySettings.from_options({"rho": 0.2, "max_histroy": 8})
    assert PolicySettings.from_options({"rho": 0.2}) == PolicySettings(rho=0.2)
