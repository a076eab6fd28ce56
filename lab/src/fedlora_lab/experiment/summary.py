"""The experiment's statistics: every metric of every method as mean ± 95% confidence interval across seeds.

Pure functions over results.json's payload (Student t intervals; the reduction factor of each method
against full fine-tuning with a bootstrap interval; per-round curves); failed runs are counted,
never averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

import numpy as np
from scipy import stats

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "FACTOR_METRICS",
    "GROUPS",
    "MEMORIZATION_METRICS",
    "REFERENCE_MODE",
    "Interval",
    "MethodFactors",
    "MethodSummary",
    "ReductionFactor",
    "RoundCurve",
    "RoundPoint",
    "audited_prefixes",
    "finished_runs",
    "format_factor",
    "format_interval",
    "mean_ci",
    "method_runs",
    "reduction_factor",
    "reduction_factors",
    "result_methods",
    "round_curves",
    "summarize",
]

GROUPS: Final = ("control", "1x", "10x")
MEMORIZATION_METRICS: Final[tuple[tuple[str, str, int], ...]] = (
    ("exact_match_rate", "Exact 50-token match rate", 3),
    ("approx_match_rate", "Approximate match rate (BLEU >= 0.75)", 3),
    ("token_accuracy", "Token accuracy of the continuation", 3),
    ("pii_extraction_rate", "PII extraction rate", 3),
    ("mean_exposure", "Mean exposure (bits)", 2),
    ("mean_exposure_extrapolated", "Mean extrapolated exposure (bits)", 2),
)
FACTOR_METRICS: Final[tuple[tuple[str, str], ...]] = (
    ("exact_match_rate", "exact match (10x)"),
    ("approx_match_rate", "approx match (10x)"),
)
BOOTSTRAP_RESAMPLES: Final = 10_000
BOOTSTRAP_SEED: Final = 0
"""Every bootstrap starts from this seed, so the same results.json always gives the same report."""
REFERENCE_MODE: Final = "full"
_MIB: Final = 2**20


@dataclass(frozen=True)
class Interval:
    """Mean of n values and the half width of its confidence interval (None when n < 2)."""

    mean: float | None
    half_width: float | None
    n: int


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} · s / sqrt(n) over the non-missing values (s: sample standard deviation)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(None, None, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    quantile = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    return Interval(mean, quantile * sd / math.sqrt(n), n)


def format_interval(interval: Interval, digits: int = 3) -> str:
    """'1.234 ± 0.056'; 'n=1' beside a single value; an em dash when nothing was measured."""
    if interval.mean is None:
        return "—"
    if interval.half_width is None:
        return f"{interval.mean:.{digits}f} (n=1)"
    return f"{interval.mean:.{digits}f} ± {interval.half_width:.{digits}f}"


@dataclass(frozen=True)
class MethodSummary:
    name: str
    label: str
    lora_rank: int | None
    runs: int
    ok: int
    metrics: Mapping[str, Interval]
    aggregation: str | None = None
    """fedavg or ffa: the method's, or what its runs' coordinators report; None when neither says."""


def _memorization_value(run: Mapping[str, Any], group: str, metric: str, prefix: str | None = None) -> float | None:
    memorization = run.get("memorization") or {}
    section = (
        memorization.get("by_duplication") if prefix is None else (memorization.get("by_prefix") or {}).get(prefix)
    )
    value = ((section or {}).get(group) or {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def audited_prefixes(results: Mapping[str, Any]) -> list[str]:
    seen: set[str] = set()
    for run in results.get("runs", []):
        seen.update(((run.get("memorization") or {}).get("by_prefix") or {}).keys())
    return sorted(seen, key=lambda p: int(p) if p.isdigit() else 0)


def _run_metrics(run: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, float | None]:
    moved = (run.get("upload_bytes") or 0) + (run.get("download_bytes") or 0)
    out: dict[str, float | None] = {
        "eval_loss": run.get("eval_loss"),
        "perplexity": run.get("perplexity"),
        "base_eval_loss": run.get("base_eval_loss"),
        "epsilon": run.get("epsilon"),
        "trainable_fraction": run.get("trainable_fraction"),
        "mib_moved": moved / _MIB,
        "minutes": (run.get("duration_s") or 0) / 60 + (run.get("audit_duration_s") or 0) / 60,
    }
    second = {"memorization": (run.get("second_decoding") or {}).get("memorization")}
    for metric, _, _ in MEMORIZATION_METRICS:
        for group in GROUPS:
            out[f"{metric}.{group}"] = _memorization_value(run, group, metric)
            out[f"second_decoding.{metric}.{group}"] = _memorization_value(second, group, metric)
            for prefix in prefixes:
                out[f"{metric}.{group}@{prefix}"] = _memorization_value(run, group, metric, prefix)
    return out


def result_methods(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """results.json's methods, or (without them) one per method name its runs carry, in order."""
    return list(
        results.get("methods")
        or [
            {"name": name, "label": name, "lora_rank": None}
            for name in dict.fromkeys(run["method"] for run in results.get("runs", []))
        ]
    )


def method_runs(results: Mapping[str, Any], method: str) -> list[Mapping[str, Any]]:
    return [r for r in results.get("runs", []) if r["method"] == method]


def finished_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in runs if r.get("status") == "ok"]


def summarize(results: Mapping[str, Any], confidence: float = 0.95) -> list[MethodSummary]:
    """Per method (in config order), every metric as mean ± CI over its successful runs."""
    prefixes = audited_prefixes(results)
    out = []
    for method in result_methods(results):
        runs = method_runs(results, method["name"])
        ok = finished_runs(runs)
        per_run = [_run_metrics(r, prefixes) for r in ok]
        keys = list(per_run[0]) if per_run else []
        metrics = {key: mean_ci([m[key] for m in per_run], confidence) for key in keys}
        reported = {r["aggregation"] for r in ok if r.get("aggregation")}
        out.append(
            MethodSummary(
                name=method["name"],
                label=method.get("label") or method["name"],
                lora_rank=method.get("lora_rank"),
                runs=len(runs),
                ok=len(ok),
                metrics=metrics,
                aggregation=method.get("aggregation") or ("/".join(sorted(reported)) or None),
            )
        )
    return out


# ---- reduction factor: full fine-tuning's extraction rate over each method's -----------------------


@dataclass(frozen=True)
class ReductionFactor:
    """mean(reference rates) / mean(method rates) over seeds, with a percentile-bootstrap interval.

    ``factor`` is None when the method's mean rate is 0 (unbounded above) or both means are 0; then
    ``lower_bound`` (when the method's audited canaries are known and the reference extracted any)
    is the reference's mean over 3 / ``trials``: the rule of three's 95% upper bound on a rate of
    which none of ``trials`` canaries (all its seeds' together) was extracted. At three seeds of n
    canaries each that is 1/n, the smallest rate one run resolves. ``low``/``high`` are None below
    two seeds on either side; ``high`` is math.inf when enough resamples of the method's seeds
    extracted nothing.
    """

    factor: float | None
    low: float | None
    high: float | None
    lower_bound: float | None
    n_reference: int
    n_method: int
    trials: int | None


def _finite(values: Sequence[float | None]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def _bootstrap_ratio(
    reference: np.ndarray[Any, np.dtype[np.float64]],
    method: np.ndarray[Any, np.dtype[np.float64]],
    rng: np.random.Generator,
    resamples: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile interval of mean/mean over resamples of each side's seeds (with replacement, independently).

    A resample whose method mean is 0 is an infinite ratio (kept: it is what pushes ``high`` to
    infinity); one where both means are 0 has no ratio and is left out.
    """
    numerators = rng.choice(reference, size=(resamples, reference.size)).mean(axis=1)
    denominators = rng.choice(method, size=(resamples, method.size)).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = numerators / denominators
    ratios = ratios[~np.isnan(ratios)]
    tail = (1 - confidence) / 2
    # inverted_cdf picks order statistics: interpolating between infinite ratios would give nan
    low, high = np.quantile(ratios, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def reduction_factor(
    reference: Sequence[float | None],
    method: Sequence[float | None],
    *,
    trials: int | None,
    rng: np.random.Generator,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
) -> ReductionFactor:
    """How many times the reference's mean rate over seeds is the method's, with a bootstrap interval.

    ``trials``: the canaries the method's audits scored over all its seeds (the N of "0 of N").
    """
    ref, other = _finite(reference), _finite(method)
    if ref.size == 0 or other.size == 0:
        return ReductionFactor(None, None, None, None, ref.size, other.size, trials)
    numerator, denominator = float(ref.mean()), float(other.mean())
    if denominator == 0:
        bound = numerator * trials / 3 if trials and numerator > 0 else None
        return ReductionFactor(None, None, None, bound, ref.size, other.size, trials)
    factor = numerator / denominator
    if min(ref.size, other.size) < 2:
        return ReductionFactor(factor, None, None, None, ref.size, other.size, trials)
    low, high = _bootstrap_ratio(ref, other, rng, resamples, confidence)
    return ReductionFactor(factor, low, high, None, ref.size, other.size, trials)


@dataclass(frozen=True)
class MethodFactors:
    """One method's reduction factors against the reference (full fine-tuning), by metric."""

    name: str
    label: str
    reference: str
    factors: Mapping[str, ReductionFactor]


def reduction_factors(
    results: Mapping[str, Any], *, group: str = "10x", resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[MethodFactors]:
    """Each method not in mode full against the first that is, for each of FACTOR_METRICS on ``group``.

    Every (method, metric) pair draws from a generator of its own seeded with ``seed``, so a
    factor does not depend on which others are computed. [] when no method is full.
    """
    methods = result_methods(results)
    reference = next((m for m in methods if m.get("mode") == REFERENCE_MODE), None)
    if reference is None:
        return []
    reference_runs = finished_runs(method_runs(results, reference["name"]))
    out = []
    for method in methods:
        if method.get("mode") == REFERENCE_MODE:
            continue
        runs = finished_runs(method_runs(results, method["name"]))
        counts = [_memorization_value(r, group, "count") for r in runs]
        trials = int(sum(c for c in counts if c is not None)) if runs and None not in counts else None
        factors = {
            metric: reduction_factor(
                [_memorization_value(r, group, metric) for r in reference_runs],
                [_memorization_value(r, group, metric) for r in runs],
                trials=trials,
                rng=np.random.default_rng(seed),
                resamples=resamples,
            )
            for metric, _ in FACTOR_METRICS
        }
        label = method.get("label") or method["name"]
        out.append(MethodFactors(method["name"], label, reference.get("label") or reference["name"], factors))
    return out


def _number(value: float, digits: int) -> str:
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def format_factor(factor: ReductionFactor, digits: int = 2) -> str:
    """'5.00 [2.86, ∞]'; '5.00 (n=1)' without an interval; '> 12.00 (0 of 36)' when the method extracted none."""
    if factor.factor is None:
        if factor.lower_bound is None:
            return "—"
        return f"> {_number(factor.lower_bound, digits)} (0 of {factor.trials})"
    if factor.low is None or factor.high is None:
        return f"{_number(factor.factor, digits)} (n=1)"
    return f"{_number(factor.factor, digits)} [{_number(factor.low, digits)}, {_number(factor.high, digits)}]"


# ---- per-round curves: memorization against held-out loss as training goes -------------------------


@dataclass(frozen=True)
class RoundPoint:
    """One round of a method, each field the mean over the seeds that measured it (None: none did)."""

    round: int
    eval_loss: float | None
    exact_match_10x: float | None
    approx_match_10x: float | None
    exposure_10x: float | None
    exposure_control: float | None


@dataclass(frozen=True)
class RoundCurve:
    name: str
    label: str
    points: tuple[RoundPoint, ...]


_ROUND_VALUES: Final = tuple(f.name for f in fields(RoundPoint) if f.name != "round")


def round_curves(results: Mapping[str, Any]) -> list[RoundCurve]:
    """Per method, each round's fields (execute's ``rounds``) averaged over its successful seeds."""
    out = []
    for method in result_methods(results):
        records = [
            record for run in finished_runs(method_runs(results, method["name"])) for record in run.get("rounds") or []
        ]
        numbers = sorted({int(record["round"]) for record in records})
        points = tuple(
            RoundPoint(
                number,
                **{key: mean_ci([r.get(key) for r in records if r["round"] == number]).mean for key in _ROUND_VALUES},
            )
            for number in numbers
        )
        out.append(RoundCurve(method["name"], method.get("label") or method["name"], points))
    return out
