"""The experiment's report: results.json -> report.md and report.html with PNG plots.

Pure functions from results to tables (mean ± 95% confidence interval across seeds, Student t),
then plots (matplotlib, Agg) and two documents written atomically. Failed runs are counted, never
averaged in.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from scipy import stats

from fedlora_common.files import atomic_write
from fedlora_server.document import figure_png, new_figure

__all__ = [
    "GROUPS",
    "MEMORIZATION_METRICS",
    "Interval",
    "MethodSummary",
    "format_interval",
    "mean_ci",
    "render_html",
    "render_markdown",
    "summarize",
    "tables",
    "write_experiment_report",
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


def _prefixes(results: Mapping[str, Any]) -> list[str]:
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
    prefixes = _prefixes(results)
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


def _cell(summary: MethodSummary, key: str, digits: int = 3) -> str:
    return format_interval(summary.metrics.get(key, Interval(None, None, 0)), digits)


def _base_loss(results: Mapping[str, Any], *, exp: bool = False) -> str:
    """The base model's held-out loss (or perplexity); it differs across seeds only by the data."""
    losses = [run.get("base_eval_loss") for run in results.get("runs", []) if run.get("status") == "ok"]
    values = [math.exp(v) if exp else v for v in losses if isinstance(v, int | float) and v < 700]
    return format_interval(mean_ci(values), 2 if exp else 3)


def tables(results: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows); markdown and HTML render the same tables."""
    summaries = summarize(results)
    prefixes = _prefixes(results)
    out: list[tuple[str, list[str], list[list[str]]]] = []
    out.append(
        (
            "Utility and cost",
            ["method", "runs ok", "held-out loss", "perplexity", "epsilon", "MiB moved", "minutes"],
            [
                [
                    s.label,
                    f"{s.ok}/{s.runs}",
                    _cell(s, "eval_loss"),
                    _cell(s, "perplexity", 2),
                    _cell(s, "epsilon", 2),
                    _cell(s, "mib_moved", 1),
                    _cell(s, "minutes", 1),
                ]
                for s in summaries
            ]
            + [["base model (not fine-tuned)", "", _base_loss(results), _base_loss(results, exp=True), "", "", ""]],
        )
    )
    for metric, title, digits in MEMORIZATION_METRICS:
        out.append(
            (
                f"{title}, by duplication",
                ["method", *GROUPS],
                [[s.label, *(_cell(s, f"{metric}.{g}", digits) for g in GROUPS)] for s in summaries],
            )
        )
    for metric, title, digits in MEMORIZATION_METRICS[:3:2]:
        if prefixes:
            out.append(
                (
                    f"{title} of the 10x canaries (control in brackets), by prefix length",
                    ["method", *(f"prefix {p}" for p in prefixes)],
                    [
                        [
                            s.label,
                            *(
                                f"{_cell(s, f'{metric}.10x@{p}', digits)} [{_cell(s, f'{metric}.control@{p}', digits)}]"
                                for p in prefixes
                            ),
                        ]
                        for s in summaries
                    ],
                )
            )
    return out


def _failures(results: Mapping[str, Any]) -> list[str]:
    return [
        f"{run['method']} seed {run['seed']}: {run.get('error') or 'failed'}"
        for run in results.get("runs", [])
        if run.get("status") != "ok"
    ]


_PREAMBLE: Final = (
    "Each cell is the mean over seeds ± the half width of a 95% confidence interval (Student t, "
    "n-1 degrees of freedom); 'n=1' marks a single run, where no interval exists. Memorization is "
    "measured on each site's canaries (trained 1x or 10x) and on never-trained controls of the same "
    "format, merged over the sites with count-weighted means; what the controls score is what the "
    "record templates alone predict."
)


def render_markdown(results: Mapping[str, Any], images: Sequence[tuple[str, str]] = ()) -> str:
    lines = [f"# Experiment `{results.get('experiment', 'experiment')}`", ""]
    if results.get("description"):
        lines += [str(results["description"]).strip(), ""]
    lines += [
        f"- base model: `{results.get('base_model')}`; seeds: {', '.join(str(s) for s in results.get('seeds', []))}",
        _PREAMBLE,
        "",
    ]
    for title, header, rows in tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    for alt, file in images:
        lines += [f"![{alt}]({file})", ""]
    failures = _failures(results)
    if failures:
        lines += ["## Failed runs", "", *(f"- {f}" for f in failures), ""]
    return "\n".join(lines)


def render_html(results: Mapping[str, Any], images: Sequence[tuple[str, bytes]] = ()) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>FedLoRA experiment {html.escape(str(results.get('experiment', '')))}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>Experiment <code>{html.escape(str(results.get('experiment', '')))}</code></h1>",
    ]
    if results.get("description"):
        parts.append(f"<p>{html.escape(str(results['description']))}</p>")
    parts.append(
        f"<p>Base model <code>{html.escape(str(results.get('base_model')))}</code>. {html.escape(_PREAMBLE)}</p>"
    )
    for title, header, rows in tables(results):
        parts.append(f"<h2>{html.escape(title)}</h2><table><thead><tr>")
        parts.extend(f"<th>{html.escape(h)}</th>" for h in header)
        parts.append("</tr></thead><tbody>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
    for alt, png in images:
        parts.append(
            f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        )
    failures = _failures(results)
    if failures:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failures) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)


# --------------------------------------------------------------------------- plots


def _mean(interval: Interval) -> float:
    return interval.mean if interval.mean is not None else math.nan


def _err(interval: Interval) -> float:
    return interval.half_width if interval.half_width is not None else 0.0


_PANELS: Final = (
    ("exact_match_rate", "exact match rate"),
    ("token_accuracy", "token accuracy"),
    ("pii_extraction_rate", "PII extraction rate"),
    ("mean_exposure", "mean exposure (bits)"),
)


def plot_duplication(summaries: Sequence[MethodSummary]) -> bytes:
    """Grouped bars: memorization by duplication (control, 1x, 10x), one bar per method, 95% CI."""
    fig = new_figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    width = 0.8 / max(1, len(summaries))
    for ax, (metric, title) in zip(axes.flat, _PANELS, strict=True):
        for i, s in enumerate(summaries):
            intervals = [s.metrics.get(f"{metric}.{g}", Interval(None, None, 0)) for g in GROUPS]
            xs = [g + (i - (len(summaries) - 1) / 2) * width for g in range(len(GROUPS))]
            errors = [_err(iv) for iv in intervals] if any(iv.half_width is not None for iv in intervals) else None
            ax.bar(xs, [_mean(iv) for iv in intervals], width, yerr=errors, capsize=3, label=s.label)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0 if metric == "mean_exposure" else 0.05))
        ax.set_xticks(range(len(GROUPS)), ["control (never trained)", "1x", "10x"])
        ax.set(title=title, xlabel="duplication in training data")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Memorization vs duplication, by method (mean ± 95% CI over seeds)")
    return figure_png(fig)


def plot_rank(summaries: Sequence[MethodSummary]) -> bytes:
    """Memorization of 10x canaries and controls against LoRA rank."""
    ranked = sorted((s for s in summaries if s.lora_rank is not None), key=lambda s: s.lora_rank or 0)
    fig = new_figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    ranks = [s.lora_rank for s in ranked]
    for ax, (metric, title) in zip(axes, _PANELS[:2], strict=True):
        for group, style in (("10x", "o-"), ("1x", "s--"), ("control", "^:")):
            intervals = [s.metrics.get(f"{metric}.{group}", Interval(None, None, 0)) for s in ranked]
            ax.errorbar(
                ranks,
                [_mean(iv) for iv in intervals],
                yerr=[_err(iv) for iv in intervals],
                fmt=style,
                capsize=3,
                label=group,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(title=title, xlabel="LoRA rank")
        ax.legend(fontsize=8)
    fig.suptitle("Memorization vs LoRA rank (mean ± 95% CI)")
    return figure_png(fig)


def plot_utility(summaries: Sequence[MethodSummary]) -> bytes:
    """One point per method: held-out loss against the 10x canaries' token accuracy, both with 95% CI."""
    fig = new_figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for s in summaries:
        x = s.metrics.get("token_accuracy.10x", Interval(None, None, 0))
        y = s.metrics.get("eval_loss", Interval(None, None, 0))
        ax.errorbar([_mean(x)], [_mean(y)], xerr=[_err(x)], yerr=[_err(y)], fmt="o", capsize=3, label=s.label)
    controls = [s.metrics.get("token_accuracy.control") for s in summaries]
    control_means = [c.mean for c in controls if c is not None and c.mean is not None]
    if control_means:
        ax.axvline(sum(control_means) / len(control_means), color="grey", linestyle="--", label="controls (mean)")
    ax.set(
        xlabel="token accuracy on 10x canaries (memorization)",
        ylabel="held-out loss, nats/token (lower is better)",
        title="Utility vs memorization",
    )
    ax.legend(fontsize=8)
    return figure_png(fig)


def write_experiment_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG plots, report.md and report.html into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(results)
    plots: list[tuple[str, str, bytes]] = [
        ("Memorization vs duplication by method", "memorization_vs_duplication.png", plot_duplication(summaries)),
    ]
    if results.get("varies_rank") and sum(s.lora_rank is not None for s in summaries) > 1:
        plots.append(("Memorization vs LoRA rank", "memorization_vs_rank.png", plot_rank(summaries)))
    plots.append(("Utility vs memorization", "utility_vs_memorization.png", plot_utility(summaries)))
    written = []
    for _, file, png in plots:
        atomic_write(out_dir / file, png)
        written.append(out_dir / file)
    markdown = render_markdown(results, [(alt, file) for alt, file, _ in plots])
    page = render_html(results, [(alt, png) for alt, _, png in plots])
    for name, text in (("report.md", markdown), ("report.html", page)):
        atomic_write(out_dir / name, text.encode("utf-8"))
        written.append(out_dir / name)
    return written
