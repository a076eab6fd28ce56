"""How far the coordinator trusts what a worker says about itself: every number finite and in range.

Self-reported figures end up in averages, the store (SQLite integers are 64-bit) and report.json
(strict JSON has no NaN or Infinity); one value out of range would spoil all three. A value
outside its range is refused with InvalidArgument naming the field.
"""

from __future__ import annotations

import math

from fedlora_common.messages import MetricsReport, UploadHeader
from fedlora_server.errors import InvalidArgument

__all__ = ["MAX_COUNT", "check_count", "check_report", "check_upload_numbers"]

MAX_COUNT = 2**53
"""Counts (examples, tokens) above this are not counts: they would lose precision as floats."""
MAX_LOSS = 1e6
MAX_TOKENS_PER_SECOND = 1e12
MAX_EPSILON = 1e6
MAX_EXPOSURE = 1e3


def check_count(name: str, value: int, *, low: int = 0, high: int = MAX_COUNT) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be an integer in [{low}, {high}], got {value}")


def check_real(name: str, value: float, *, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{name} must be finite and in [{low:g}, {high:g}], got {value!r}")


def check_upload_numbers(header: UploadHeader) -> None:
    check_count("num_examples", header.num_examples, low=1)
    check_real("train_loss", header.train_loss, low=0.0, high=MAX_LOSS)


def check_report(report: MetricsReport) -> None:
    check_real("eval_loss", report.eval_loss, low=0.0, high=MAX_LOSS)
    check_count("eval_tokens", report.eval_tokens)
    check_real("train_loss", report.train_loss, low=0.0, high=MAX_LOSS)
    check_real("tokens_per_second", report.tokens_per_second, low=0.0, high=MAX_TOKENS_PER_SECOND)
    if report.record_epsilon is not None:
        check_real("record_epsilon", report.record_epsilon, low=0.0, high=MAX_EPSILON)
    if report.memorization is None:
        return
    groups = {"overall": report.memorization.overall, **report.memorization.by_duplication}
    for group, rates in groups.items():
        check_count(f"memorization.{group}.count", rates.count)
        for name in ("exact_match_rate", "approx_match_rate", "token_accuracy", "pii_extraction_rate"):
            check_real(f"memorization.{group}.{name}", getattr(rates, name), low=0.0, high=1.0)
        check_real(f"memorization.{group}.mean_exposure", rates.mean_exposure, low=0.0, high=MAX_EXPOSURE)
