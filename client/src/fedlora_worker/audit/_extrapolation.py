"""Extrapolated exposure (Carlini et al. 2019, §5.2): the rank-based exposure stops at log2 |R| once the
secret ranks first; a distribution fitted to the candidates' scores says how far beyond them it lies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
from scipy import stats

from fedlora_worker.audit._metrics import exposure

__all__ = ["MIN_FIT_CANDIDATES", "extrapolated_exposure"]

MIN_FIT_CANDIDATES: Final = 32
"""The fewest candidates (|R|, the secret included) a skew-normal is fitted to. Below, the maximum-
likelihood shape is often infinite (a cut-off tail) and the extrapolated tail swings by many bits."""


def extrapolated_exposure(true_score: float, other_scores: Sequence[float], *, space: int) -> float:
    """-log2 P(X <= the secret's log-perplexity), X a skew-normal fitted (MLE) to the other candidates'.

    Scores are log-likelihoods, as `exposure` ranks them (higher: more likely); a log-perplexity is
    one negated, so a secret more likely than its candidates lies in the fitted lower tail. Inside
    the candidates this agrees with `exposure`; beyond the most likely of them it keeps growing.

    The tail probability is floored at 1 / ``space``, the number of values the secret's format
    allows: no secret is more exposed than ranking first among all of them (log2 ``space`` bits),
    and the value stays finite where the tail underflows. Where nothing can be fitted (fewer than
    MIN_FIT_CANDIDATES candidates, their scores all equal, or a score not finite) this is the
    rank-based `exposure`: it estimates the same tail from the candidates alone, claiming no more
    than they show.
    """
    size = len(other_scores) + 1
    if space < size:
        raise ValueError(f"space: the format must allow the {size} candidates ranked, got {space}")
    perplexities = -np.asarray(other_scores, dtype=np.float64)
    fittable = size >= MIN_FIT_CANDIDATES and math.isfinite(true_score) and np.isfinite(perplexities).all()
    if not fittable or np.ptp(perplexities) == 0:
        return exposure(true_score, other_scores)
    # Standardized first: skewnorm is a location-scale family, and the optimizer converges on unit data.
    center, spread = perplexities.mean(), perplexities.std()
    shape, loc, scale = stats.skewnorm.fit((perplexities - center) / spread)
    log_tail = float(stats.skewnorm.logcdf((-true_score - center) / spread, shape, loc, scale))
    return min(-log_tail, math.log(space)) / math.log(2)
