"""Extrapolated exposure: agrees with the rank inside the candidates, keeps growing beyond them, stays finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedlora_worker.audit import MIN_FIT_CANDIDATES, exposure, extrapolated_exposure

SPACE = 10**8  # values of an "MRN-dddd-dddd" secret
OTHERS = 4095  # |R| = 4096: the rank resolves tails down to 2^-12


def _scores(shape: float, count: int = OTHERS, seed: int = 0) -> np.ndarray:
    """Candidates' log-likelihoods whose log-perplexities (their negations) are skew-normal."""
    rng = np.random.default_rng(seed)
    return -np.asarray(stats.skewnorm.rvs(shape, loc=40.0, scale=6.0, size=count, random_state=rng))


@pytest.mark.parametrize("shape", [-4.0, 0.0, 4.0])
def test_inside_the_candidates_it_agrees_with_the_rank_within_half_a_bit(shape: float) -> None:
    # Prepare: secrets between the k-th and (k+1)-th most likely candidates, ranked k + 1.
    others = _scores(shape)
    ordered = np.sort(others)[::-1]
    ks = [64, 128, 256, 512, 1024, 2048]

    # Execute
    pairs = [
        (extrapolated_exposure(true, others.tolist(), space=SPACE), exposure(true, others.tolist()))
        for true in ((ordered[k - 1] + ordered[k]) / 2 for k in ks)
    ]

    # Assert: the rank's own tail estimate k/|R| has a relative error of about 1/sqrt(k), at k >= 64
    # 1/(8 ln 2) = 0.18 bit; half a bit is ~3 of those (30 seeds of these shapes stayed within 0.3).
    for (extrapolated, ranked), k in zip(pairs, ks, strict=True):
        assert extrapolated == pytest.approx(ranked, abs=0.5), f"rank {k + 1}"


def test_it_grows_with_the_secrets_likelihood() -> None:
    others = _scores(4.0).tolist()
    trues = np.linspace(-80.0, -5.0, 40)

    values = [extrapolated_exposure(float(true), others, space=SPACE) for true in trues]

    assert values == sorted(values)
    assert values[0] < 0.01
    assert values[-1] > math.log2(OTHERS + 1)


@pytest.mark.parametrize("shape", [-4.0, 0.0, 4.0])
def test_beyond_the_candidates_it_recovers_the_tail_they_were_drawn_from(shape: float) -> None:
    # Prepare: a secret whose log-perplexity the generating distribution puts at tail 2^-16, 16 bits,
    # four beyond the 12 bits 4096 candidates can rank.
    others = _scores(shape).tolist()
    true = -float(stats.skewnorm.ppf(2.0**-16, shape, loc=40.0, scale=6.0))

    # Execute
    extrapolated = extrapolated_exposure(true, others, space=SPACE)

    # Assert: within 2 bits of 16 (20 seeds of these shapes ranged from -0.8 to +2.0 bits), and above the rank.
    assert exposure(true, others) == pytest.approx(12.0)
    assert extrapolated == pytest.approx(16.0, abs=2.0)


def test_a_secret_far_more_likely_than_every_candidate_is_floored_at_its_formats_space() -> None:
    others = _scores(0.0, count=127).tolist()
    true = max(others) + 1e4  # its tail underflows to probability 0

    extrapolated = extrapolated_exposure(true, others, space=SPACE)

    assert exposure(true, others) == pytest.approx(7.0)  # the ceiling of the rank
    assert math.isfinite(extrapolated)
    assert extrapolated == pytest.approx(math.log2(SPACE))


@pytest.mark.parametrize(
    "others",
    [
        pytest.param([-50.0] * 127, id="candidates-all-equal"),
        pytest.param(_scores(0.0, count=MIN_FIT_CANDIDATES - 2).tolist(), id="too-few-candidates"),
        pytest.param([*_scores(0.0, count=126).tolist(), -math.inf], id="a-score-not-finite"),
    ],
)
def test_where_nothing_can_be_fitted_it_is_the_rank_based_exposure(others: list[float]) -> None:
    for true in (0.0, -50.0, -1e3):
        assert extrapolated_exposure(true, others, space=SPACE) == exposure(true, others)


def test_a_space_smaller_than_the_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="space: the format must allow the 128 candidates"):
        extrapolated_exposure(0.0, _scores(0.0, count=127).tolist(), space=100)


def test_from_the_fewest_candidates_fitted_on_it_extrapolates() -> None:
    others = _scores(0.0, count=MIN_FIT_CANDIDATES - 1).tolist()
    true = max(others) + 30.0  # five scales beyond the most likely candidate

    assert exposure(true, others) == math.log2(MIN_FIT_CANDIDATES)
    assert extrapolated_exposure(true, others, space=SPACE) > math.log2(MIN_FIT_CANDIDATES) + 1
