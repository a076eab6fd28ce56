"""Combining sites' aggregate audit rates into one, weighted by how many canaries each measured.

The coordinator combines what the sites report each round; the lab's experiment combines the
same typed rates across the sites of a run. Only aggregates ever reach this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedlora_common.messages import Memorization, MemorizationRates

__all__ = ["RATE_FIELDS", "CombinedMemorization", "combine", "memorization_from_json", "memorization_to_json"]

RATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MemorizationRates) if f.name != "count")


@dataclass(frozen=True)
class CombinedMemorization:
    """Rates over every site: `overall` over trained canaries, and by duplication group (None: none measured)."""

    overall: MemorizationRates
    sites: int
    by_duplication: dict[str, MemorizationRates | None]

    def to_json(self) -> dict[str, Any]:
        """report.json's `memorization`: the overall rates at the top level, then sites and groups."""
        groups = {g: None if r is None else asdict(r) for g, r in self.by_duplication.items()}
        return {**asdict(self.overall), "sites": self.sites, "by_duplication": groups}


def combine_rates(rates: Sequence[MemorizationRates]) -> MemorizationRates | None:
    """Count-weighted mean of each rate; None when no canary was measured."""
    count = sum(r.count for r in rates)
    if count == 0:
        return None
    means = {name: sum(getattr(r, name) * r.count for r in rates) / count for name in RATE_FIELDS}
    return MemorizationRates(count=count, **means)


def combine(sites: Sequence[Memorization]) -> CombinedMemorization | None:
    """The sites' audits as one; None when nothing trained was measured."""
    overall = combine_rates([s.overall for s in sites])
    if overall is None:
        return None
    groups = sorted({g for s in sites for g in s.by_duplication})
    by_duplication = {g: combine_rates([s.by_duplication[g] for s in sites if g in s.by_duplication]) for g in groups}
    return CombinedMemorization(overall, len(sites), by_duplication)


def memorization_to_json(memo: Memorization) -> dict[str, Any]:
    return asdict(memo)


def memorization_from_json(data: Mapping[str, Any]) -> Memorization:
    return Memorization(
        MemorizationRates(**data["overall"]),
        {group: MemorizationRates(**rates) for group, rates in data["by_duplication"].items()},
    )
