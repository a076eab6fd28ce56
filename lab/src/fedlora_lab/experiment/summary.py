"""The experiment's statistics: every metric of every method as mean ± 95% confidence interval across seeds.

Pure functions over results.json's payload (Student t intervals); failed runs are counted, never
averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from scipy import stats

__all__ = [
    "GROUPS",
    "MEMORIZATION_METRICS",
    "Interval",
    "MethodSummary",
    "audited_prefixes",
    "format_interval",
    "mean_ci",
    "summarize",
]

GROUPS: Final = ("control", "1x", "10x")
MEMORIZATION_METRICS: Final[tuple[tuple[str, str, int], ...]] = (
    ("exact_match_rate", "Exact 50-token match rate", 3),
    ("approx_match_rate", "Approximate match rate (BLEU >= 0.75)", 3),
    ("token_accuracy", "Token accuracy of the continuation", 3),
    ("pii_extraction_rate", "PII extraction rate", 3),
    ("mean_exposure", "Mean exposure (bits)", 2),
)
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
        "mib_moved": moved / _MIB,
        "minutes": (run.get("duration_s") or 0) / 60 + (run.get("audit_duration_s") or 0) / 60,
    }
    for metric, _, _ in MEMORIZATION_METRICS:
        for group in GROUPS:
            out[f"{metric}.{group}"] = _memorization_value(run, group, metric)
            for prefix in prefixes:
                out[f"{metric}.{group}@{prefix}"] = _memorization_value(run, group, metric, prefix)
    return out


def summarize(results: Mapping[str, Any], confidence: float = 0.95) -> list[MethodSummary]:
    """Per method (in config order), every metric as mean ± CI over its successful runs."""
    prefixes = audited_prefixes(results)
    methods = results.get("methods") or [
        {"name": name, "label": name, "lora_rank": None}
        for name in dict.fromkeys(run["method"] for run in results.get("runs", []))
    ]
    out = []
    for method in methods:
        runs = [r for r in results.get("runs", []) if r["method"] == method["name"]]
        ok = [r for r in runs if r.get("status") == "ok"]
        per_run = [_run_metrics(r, prefixes) for r in ok]
        keys = list(per_run[0]) if per_run else []
        metrics = {key: mean_ci([m[key] for m in per_run], confidence) for key in keys}
        out.append(
            MethodSummary(
                name=method["name"],
                label=method.get("label") or method["name"],
                lora_rank=method.get("lora_rank"),
                runs=len(runs),
                ok=len(ok),
                metrics=metrics,
            )
        )
    return out
