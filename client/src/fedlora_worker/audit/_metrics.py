"""Per-continuation memorization metrics: pure functions over token lists, texts and scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

import sacrebleu

__all__ = [
    "approx_match",
    "exact_match",
    "exposure",
    "longest_matching_prefix",
    "secret_rank",
    "sentence_bleu",
    "token_accuracy",
]


def exact_match(continuation: Sequence[int], suffix: Sequence[int]) -> bool:
    """Every suffix token reproduced in place: verbatim extraction."""
    return len(continuation) >= len(suffix) and list(continuation[: len(suffix)]) == list(suffix)


def token_accuracy(continuation: Sequence[int], suffix: Sequence[int]) -> float:
    """Fraction of suffix positions where the continuation has the same token (missing tokens count as wrong)."""
    if not suffix:
        raise ValueError("suffix: must hold at least one token")
    return sum(a == b for a, b in zip(continuation, suffix, strict=False)) / len(suffix)


def longest_matching_prefix(continuation: Sequence[int], suffix: Sequence[int]) -> int:
    """How many leading tokens the continuation gets right before its first error."""
    count = 0
    for a, b in zip(continuation, suffix, strict=False):
        if a != b:
            break
        count += 1
    return count


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (default exponential smoothing) scaled to [0, 1]."""
    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score) / 100.0


def approx_match(hypothesis: str, reference: str, *, threshold: float = 0.75) -> bool:
    """Near-verbatim extraction: BLEU at least ``threshold`` catches copies that differ in a token or two."""
    return sentence_bleu(hypothesis, reference) >= threshold


def secret_rank(true_score: float, other_scores: Sequence[float]) -> int:
    """Rank of the true secret among all candidates by score, 1 = most likely.

    Ties count against the secret, so a model indifferent to the value gets the worst rank, never the best.
    """
    return 1 + sum(score >= true_score for score in other_scores)


def exposure(true_score: float, other_scores: Sequence[float]) -> float:
    """Carlini et al. (2019): log2 |R| - log2 rank, from 0 (ranked last) to log2 |R| (ranked first)."""
    size = len(other_scores) + 1
    return math.log2(size) - math.log2(secret_rank(true_score, other_scores))
