"""The audit summary's typed form: read from what `fedlora-lab audit` writes, combined over sites, written back."""

from __future__ import annotations

from typing import Any

import pytest

from fedlora_common.memorization import AuditRates, audit_summary_from_json, combine_audit_rates


def _stats(count: int, exact: float | None) -> dict[str, Any]:
    """One group's aggregates, keyed as the worker's AuditReport.summary() writes them."""
    return {
        "exact_match_rate": exact,
        "approx_match_rate": exact,
        "token_accuracy": 0.25,
        "max_token_accuracy": 0.5,
        "mean_longest_prefix": 3.0,
        "longest_prefix_max": 9.0,
        "pii_extraction_rate": 0.0,
        "mean_exposure": 2.0,
        "worst_exposure": 4.0,
        "mean_exposure_extrapolated": 3.0,
        "worst_exposure_extrapolated": 9.5,
        "count": count,
        "pii_secrets": 4 * count,
        "exposure_count": count,
    }


def _summary() -> dict[str, Any]:
    groups = {"control": _stats(2, 0.0), "1x": _stats(3, 0.0), "10x": _stats(1, 1.0)}
    return {
        "exact_match_rate": 0.25,
        "by_duplication": groups,
        "by_prefix": {"10": groups},
        "config": {"prefixes": [10]},
        "records": {"control": 2, "1x": 3, "10x": 1},
        "seconds": 1.5,
    }


def test_a_summary_reads_into_typed_rates_and_writes_back_the_same_figures() -> None:
    summary = audit_summary_from_json(_summary())

    again = audit_summary_from_json(summary.to_json())

    assert again == summary
    assert summary.by_prefix["10"]["10x"].count == 1
    assert summary.overall.exact_match_rate == pytest.approx(0.25)  # 1 of the 4 trained canaries
    assert summary.overall.count == 4


def test_a_summary_missing_a_figure_is_refused_by_name() -> None:
    data = _summary()
    del data["by_duplication"]["10x"]["worst_exposure"]

    with pytest.raises(ValueError, match="missing worst_exposure"):
        audit_summary_from_json(data)


def test_unmeasured_rates_stay_unmeasured_and_worst_cases_take_the_largest() -> None:
    measured = AuditRates.from_json(_stats(3, 0.5))
    unmeasured = AuditRates.from_json({**_stats(0, None), "worst_exposure": 6.0})

    combined = combine_audit_rates([measured, unmeasured])

    assert combined.exact_match_rate == 0.5
    assert combined.worst_exposure == 6.0
    assert combined.count == 3


def test_extrapolated_exposure_combines_weighted_by_the_exposures_measured_and_its_worst_is_the_largest() -> None:
    few = AuditRates.from_json(
        {**_stats(1, 0.0), "mean_exposure_extrapolated": 20.0, "worst_exposure_extrapolated": 20.0}
    )
    many = AuditRates.from_json(
        {**_stats(3, 0.0), "mean_exposure_extrapolated": 4.0, "worst_exposure_extrapolated": 8.0}
    )
    unmeasured = AuditRates.from_json(
        {**_stats(0, None), "mean_exposure_extrapolated": None, "worst_exposure_extrapolated": None}
    )

    combined = combine_audit_rates([few, many, unmeasured])

    assert combined.exposure_count == 4
    assert combined.mean_exposure_extrapolated == pytest.approx((20.0 * 1 + 4.0 * 3) / 4)
    assert combined.worst_exposure_extrapolated == 20.0
