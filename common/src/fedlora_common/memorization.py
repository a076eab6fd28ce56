"""Combining sites' aggregate audit results into one, each figure weighted by what it was measured over.

Two typed views of one audit: ``Memorization`` (the rates the wire carries each round, which the
coordinator combines) and ``AuditSummary`` (the audit's whole summary: worst cases, counts and
per-prefix rates, which the lab's experiment combines across the sites of a run). Only aggregates
ever reach this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from fedlora_common.messages import Memorization, MemorizationRates

__all__ = [
    "RATE_FIELDS",
    "AuditRates",
    "AuditSummary",
    "CombinedMemorization",
    "audit_summary_from_json",
    "combine",
    "combine_audit_rates",
    "combine_rates",
    "combine_summaries",
    "memorization_from_json",
    "memorization_to_json",
]

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


_TRAINED: Final = ("1x", "10x")


def _over(count: str) -> Any:
    """A mean measured over the field ``count`` of the same group: sites combine weighted by it."""
    return field(metadata={"over": count})


def _worst() -> Any:
    """A maximum: sites combine by taking the largest."""
    return field(metadata={"worst": True})


@dataclass(frozen=True)
class AuditRates:
    """One group's audit aggregates, at one prefix or the best over prefixes; None: nothing measured.

    ``count`` records had a continuation scored, ``pii_secrets`` (record, secret) pairs were probed,
    ``exposure_count`` records had their exposure ranked (and extrapolated: the ``_extrapolated``
    figures go past log2 of the candidates where the rank stops; they stay off the wire).
    """

    count: int
    pii_secrets: int
    exposure_count: int
    exact_match_rate: float | None = _over("count")
    approx_match_rate: float | None = _over("count")
    token_accuracy: float | None = _over("count")
    mean_longest_prefix: float | None = _over("count")
    pii_extraction_rate: float | None = _over("pii_secrets")
    mean_exposure: float | None = _over("exposure_count")
    mean_exposure_extrapolated: float | None = _over("exposure_count")
    max_token_accuracy: float | None = _worst()
    longest_prefix_max: float | None = _worst()
    worst_exposure: float | None = _worst()
    worst_exposure_extrapolated: float | None = _worst()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRates:
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"audit rates: missing {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _mean(values: Sequence[tuple[float | None, int]]) -> float | None:
    measured = [(v, w) for v, w in values if v is not None and w > 0]
    total = sum(w for _, w in measured)
    return sum(v * w for v, w in measured) / total if total else None


def _largest(values: Sequence[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return max(measured) if measured else None


def combine_audit_rates(rates: Sequence[AuditRates]) -> AuditRates:
    """Counts summed, means weighted by the count each was measured over, worst cases maxed."""
    out: dict[str, Any] = {}
    for f in fields(AuditRates):
        if "over" in f.metadata:
            out[f.name] = _mean([(getattr(r, f.name), getattr(r, f.metadata["over"])) for r in rates])
        elif f.metadata.get("worst"):
            out[f.name] = _largest([getattr(r, f.name) for r in rates])
        else:
            out[f.name] = sum(getattr(r, f.name) for r in rates)
    return AuditRates(**out)


@dataclass(frozen=True)
class AuditSummary:
    """An audit's aggregates: by duplication group (control, 1x, 10x), and by group at each prefix length."""

    by_duplication: dict[str, AuditRates]
    by_prefix: dict[str, dict[str, AuditRates]]
    records: dict[str, int]

    @property
    def overall(self) -> AuditRates:
        """The trained canaries (1x and 10x) together."""
        return combine_audit_rates([self.by_duplication[g] for g in _TRAINED if g in self.by_duplication])

    def to_json(self) -> dict[str, Any]:
        """The audit summary's JSON shape: the overall rates at the top level, then groups, prefixes, records."""
        return {
            **asdict(self.overall),
            "by_duplication": {g: asdict(r) for g, r in self.by_duplication.items()},
            "by_prefix": {p: {g: asdict(r) for g, r in groups.items()} for p, groups in self.by_prefix.items()},
            "records": dict(self.records),
        }


def audit_summary_from_json(data: Mapping[str, Any]) -> AuditSummary:
    """An audit summary as ``fedlora-lab audit --out`` writes it; ValueError names what is missing."""
    try:
        return AuditSummary(
            by_duplication={g: AuditRates.from_json(r) for g, r in data["by_duplication"].items()},
            by_prefix={
                str(p): {g: AuditRates.from_json(r) for g, r in groups.items()}
                for p, groups in data["by_prefix"].items()
            },
            records={g: int(n) for g, n in data["records"].items()},
        )
    except KeyError as exc:
        raise ValueError(f"audit summary: missing {exc.args[0]}") from None


def _merged(groups: Sequence[Mapping[str, AuditRates]]) -> dict[str, AuditRates]:
    names = list(dict.fromkeys(g for group in groups for g in group))
    return {g: combine_audit_rates([group[g] for group in groups if g in group]) for g in names}


def combine_summaries(sites: Sequence[AuditSummary]) -> AuditSummary:
    """The sites' audits of one model as one: every group and prefix combined over the sites that measured it."""
    prefixes = list(dict.fromkeys(p for s in sites for p in s.by_prefix))
    return AuditSummary(
        by_duplication=_merged([s.by_duplication for s in sites]),
        by_prefix={p: _merged([s.by_prefix[p] for s in sites if p in s.by_prefix]) for p in prefixes},
        records={
            g: sum(s.records.get(g, 0) for s in sites) for g in dict.fromkeys(g for s in sites for g in s.records)
        },
    )
