"""Scaling-law reference-loss fit: recovery on synthetic curves, and the awkward curves of real runs."""

import numpy as np
import pytest

from drpruning.scheduling.scaling_law import fit_scaling_law, predict_final_loss

TOTAL_TOKENS = 48_000 * 2**20  # continued pretraining: 48k steps of 1M tokens


def _observed_tokens(points: int) -> np.ndarray:
    """Tokens of one domain at evenly spaced evals between 2% and 50% of training."""
    return np.linspace(0.02, 0.5, points) * TOTAL_TOKENS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_continued_pretraining_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    amplitude, beta, irreducible = 40.0, 0.25, 1.8
    tokens = _observed_tokens(40)
    losses = amplitude / tokens**beta + irreducible + rng.normal(0, 0.002, tokens.size)
    best = fit_scaling_law(losses, tokens)[0]
    assert not best.uses_params
    assert best.irreducible == pytest.approx(irreducible, rel=0.02)
    assert best.tokens_exponent == pytest.approx(beta, rel=0.15)
    truth = amplitude / TOTAL_TOKENS**beta + irreducible
    prediction = predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None)
    assert prediction is not None
    assert prediction == pytest.approx(truth, abs=0.01)
    assert prediction <= losses.min()


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_pruning_curve(seed: int) -> None:
    """ℓ = A/(P^α T^β) + E while the expected size shrinks from 6.7B towards 1.3B."""
    rng = np.random.default_rng(seed)
    amplitude, alpha, beta, irreducible = 1e7, 0.4, 0.3, 1.9
    tokens = np.linspace(0.05, 1.0, 48) * 3200 * 131_072
    params = np.maximum(np.linspace(6.7e9, 1.0e9, 48), 1.3e9)
    losses = amplitude / (params**alpha * tokens**beta) + irreducible + rng.normal(0, 0.002, tokens.size)
    best = fit_scaling_law(losses, tokens, params)[0]
    assert best.uses_params
    assert best.irreducible == pytest.approx(irreducible, rel=0.02)
    assert best.params_exponent == pytest.approx(alpha, rel=0.15)
    assert best.tokens_exponent == pytest.approx(beta, rel=0.15)
    assert best.amplitude == pytest.approx(amplitude, rel=0.5)
    np.testing.assert_allclose(best.predict(tokens, params), losses, atol=0.01)


def test_best_three_are_sorted_by_objective() -> None:
    tokens = _observed_tokens(20)
    losses = 30.0 / tokens**0.2 + 2.0
    fits = fit_scaling_law(losses, tokens)
    assert len(fits) == 3
    assert [fit.objective for fit in fits] == sorted(fit.objective for fit in fits)


def test_flat_curve_predicts_its_level() -> None:
    rng = np.random.default_rng(4)
    tokens = _observed_tokens(30)
    losses = 2.3 + rng.normal(0, 0.003, tokens.size)
    prediction = predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None)
    assert prediction is not None
    assert losses.min() - 0.01 <= prediction <= losses.min()


def test_rising_curve_is_clamped_to_the_lowest_observation() -> None:
    tokens = _observed_tokens(30)
    losses = 2.0 + 0.3 * tokens / tokens.max()
    assert predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None) == pytest.approx(losses.min(), abs=1e-12)


def test_noisy_curve_stays_finite_and_below_observations() -> None:
    rng = np.random.default_rng(5)
    tokens = _observed_tokens(64)
    losses = 10.0 / tokens**0.15 + 1.5 + rng.normal(0, 0.05, tokens.size)
    prediction = predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None)
    assert prediction is not None and np.isfinite(prediction)
    assert 0 <= prediction <= losses.min()


def test_too_few_points_returns_none() -> None:
    tokens = _observed_tokens(7)
    losses = 30.0 / tokens**0.2 + 2.0
    assert predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None) is None
    truth = 30.0 / TOTAL_TOKENS**0.2 + 2.0
    assert predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None, min_points=5) == pytest.approx(truth, abs=0.01)


def test_unusable_points_do_not_count() -> None:
    tokens = _observed_tokens(9)
    losses = 30.0 / tokens**0.2 + 2.0
    losses[3] = np.nan
    tokens[0] = 0.0  # a domain not sampled yet
    assert predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None) is None
    truth = 30.0 / TOTAL_TOKENS**0.2 + 2.0  # the seven usable points still lie on the curve
    assert predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None, min_points=7) == pytest.approx(truth, abs=0.01)


def test_constant_params_select_the_token_only_form() -> None:
    tokens = _observed_tokens(20)
    losses = 30.0 / tokens**0.2 + 2.0
    params = np.full(tokens.size, 1.3e9)
    assert not fit_scaling_law(losses, tokens, params)[0].uses_params
    # The parameter count at the end is irrelevant then.
    with_params = predict_final_loss(losses, tokens, params, TOTAL_TOKENS, 7e9)
    without = predict_final_loss(losses, tokens, None, TOTAL_TOKENS, None)
    assert with_params == pytest.approx(without, rel=1e-9)


def test_varying_params_need_a_target() -> None:
    tokens = _observed_tokens(20)
    params = np.linspace(6.7e9, 2e9, 20)
    losses = 1e7 / (params**0.4 * tokens**0.3) + 1.9
    with pytest.raises(ValueError, match="params_end"):
        predict_final_loss(losses, tokens, params, TOTAL_TOKENS, None)
