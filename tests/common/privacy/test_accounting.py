"""The PLD accountant against closed forms written here from first principles."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from fedlora_common.privacy import gaussian_epsilon, noise_for_epsilon


def _gaussian_delta(epsilon: float, mu: float) -> float:
    """Balle & Wang (2018), Thm. 8: the exact delta(epsilon) of a Gaussian mechanism with mu = sensitivity/sigma."""
    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2))


def _exact_epsilon(mu: float, delta: float) -> float:
    """Invert the decreasing delta(epsilon) by bisection."""
    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        if _gaussian_delta(mid, mu) > delta:
            low = mid
        else:
            high = mid
    return high


@pytest.mark.parametrize(("z", "steps"), [(0.8, 1), (1.0, 10), (2.0, 50), (5.0, 3)])
def test_composed_gaussians_match_the_closed_form(z: float, steps: int) -> None:
    # Prepare: T Gaussian mechanisms with multiplier z compose into one with mu = sqrt(T) / z.
    delta = 1e-5
    exact = _exact_epsilon(math.sqrt(steps) / z, delta)

    # Execute
    accounted = gaussian_epsilon(z, steps=steps, delta=delta)

    # Assert: the PLD accountant is a pessimistic discretisation: never below, and within 0.5%.
    assert exact - 1e-9 <= accounted <= exact * 1.005 + 1e-3


def test_sampling_amplifies_and_more_steps_cost_more() -> None:
    full = gaussian_epsilon(1.0, steps=20, delta=1e-5)
    sampled = gaussian_epsilon(1.0, steps=20, sample_rate=0.1, delta=1e-5)
    longer = gaussian_epsilon(1.0, steps=40, sample_rate=0.1, delta=1e-5)

    assert sampled < full
    assert sampled < longer
    assert gaussian_epsilon(1.0, steps=0, delta=1e-5) == 0.0


def test_noise_for_epsilon_is_the_smallest_noise_within_the_target() -> None:
    target = 4.0

    z = noise_for_epsilon(target, steps=12, delta=1e-6)

    assert gaussian_epsilon(z, steps=12, delta=1e-6) <= target
    assert gaussian_epsilon(z * 0.995, steps=12, delta=1e-6) > target
    # The closed form agrees on where the target is met.
    assert _exact_epsilon(math.sqrt(12) / z, 1e-6) == pytest.approx(target, rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 1, "delta": 0.0}, "delta"),
        ({"steps": 1, "delta": 1.0}, "delta"),
        ({"steps": -1, "delta": 1e-5}, "steps"),
        ({"steps": 1, "delta": 1e-5, "sample_rate": 0.0}, "sample_rate"),
    ],
)
def test_impossible_parameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gaussian_epsilon(1.0, **kwargs)  # type: ignore[arg-type]


def test_a_non_positive_target_epsilon_is_refused() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_for_epsilon(0.0, steps=3, delta=1e-5)
