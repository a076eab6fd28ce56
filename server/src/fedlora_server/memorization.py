"""Combining the sites' aggregate audit rates into the run's, weighted by how many canaries each measured."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedlora_common.messages import Memorization, MemorizationRates
from fedlora_server.store import MetricsRecord

__all__ = ["RATE_FIELDS", "combine", "combine_reports", "memorization_from_json", "memorization_to_json"]

RATE_FIELDS = ("exact_match_rate", "approx_match_rate", "token_accuracy", "pii_extraction_rate", "mean_exposure")


def _combine_rates(rates: Sequence[MemorizationRates]) -> dict[str, Any] | None:
    count = sum(r.count for r in rates)
    if count == 0:
        return None
    out: dict[str, Any] = {"count": count}
    for name in RATE_FIELDS:
        out[name] = sum(getattr(r, name) * r.count for r in rates) / count
    return out


def combine(sites: Sequence[Memorization]) -> dict[str, Any] | None:
    """report.json's `memorization`: rates overall (trained canaries) and by duplication count."""
    if not sites:
        return None
    overall = _combine_rates([s.overall for s in sites])
    if overall is None:
        return None
    groups = sorted({g for s in sites for g in s.by_duplication})
    by_duplication = {g: _combine_rates([s.by_duplication[g] for s in sites if g in s.by_duplication]) for g in groups}
    return {**overall, "sites": len(sites), "by_duplication": by_duplication}


def memorization_to_json(memo: Memorization) -> dict[str, Any]:
    return asdict(memo)


def memorization_from_json(data: dict[str, Any]) -> Memorization:
    return Memorization(
        MemorizationRates(**data["overall"]),
        {group: MemorizationRates(**rates) for group, rates in data["by_duplication"].items()},
    )


def combine_reports(reports: Sequence[MetricsRecord]) -> dict[str, Any] | None:
    """`combine` over the sites' stored reports that carry an audit."""
    return combine([memorization_from_json(json.loads(m.memorization_json)) for m in reports if m.memorization_json])
