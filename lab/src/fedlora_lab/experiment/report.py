"""The experiment's report: results.json -> report.md and report.html with PNG plots.

The tables (mean ± 95% confidence interval across seeds) and plots of ``summary`` and ``plots``,
as one ``fedlora_server.document.Document``; failed runs are listed, never averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from fedlora_lab.experiment.plots import plot_duplication, plot_rank, plot_utility
from fedlora_lab.experiment.summary import (
    GROUPS,
    MEMORIZATION_METRICS,
    Interval,
    MethodSummary,
    audited_prefixes,
    format_interval,
    mean_ci,
    summarize,
)
from fedlora_server.document import Document, Figure, Table, write_document

__all__ = ["experiment_document", "tables", "write_experiment_report"]


def _cell(summary: MethodSummary, key: str, digits: int = 3) -> str:
    return format_interval(summary.metrics.get(key, Interval(None, None, 0)), digits)


def _base_loss(results: Mapping[str, Any], *, exp: bool = False) -> str:
    """The base model's held-out loss (or perplexity); it differs across seeds only by the data."""
    losses = [run.get("base_eval_loss") for run in results.get("runs", []) if run.get("status") == "ok"]
    values = [math.exp(v) if exp else v for v in losses if isinstance(v, int | float) and v < 700]
    return format_interval(mean_ci(values), 2 if exp else 3)


def tables(results: Mapping[str, Any]) -> list[Table]:
    """Utility and cost, each memorization metric by duplication, and exposure and exact match by prefix."""
    summaries = summarize(results)
    prefixes = audited_prefixes(results)
    utility = [
        (
            s.label,
            f"{s.ok}/{s.runs}",
            _cell(s, "eval_loss"),
            _cell(s, "perplexity", 2),
            _cell(s, "epsilon", 2),
            _cell(s, "mib_moved", 1),
            _cell(s, "minutes", 1),
        )
        for s in summaries
    ]
    utility.append(("base model (not fine-tuned)", "", _base_loss(results), _base_loss(results, exp=True), "", "", ""))
    out = [
        Table(
            title="Utility and cost",
            columns=("method", "runs ok", "held-out loss", "perplexity", "epsilon", "MiB moved", "minutes"),
            rows=tuple(utility),
        )
    ]
    for metric, title, digits in MEMORIZATION_METRICS:
        rows = tuple((s.label, *(_cell(s, f"{metric}.{g}", digits) for g in GROUPS)) for s in summaries)
        out.append(Table(title=f"{title}, by duplication", columns=("method", *GROUPS), rows=rows))
    for metric, title, digits in MEMORIZATION_METRICS[:3:2] if prefixes else ():
        rows = tuple(
            (
                s.label,
                *(
                    f"{_cell(s, f'{metric}.10x@{p}', digits)} [{_cell(s, f'{metric}.control@{p}', digits)}]"
                    for p in prefixes
                ),
            )
            for s in summaries
        )
        out.append(
            Table(
                title=f"{title} of the 10x canaries (control in brackets), by prefix length",
                columns=("method", *(f"prefix {p}" for p in prefixes)),
                rows=rows,
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


def _figures(results: Mapping[str, Any], summaries: list[MethodSummary]) -> list[Figure]:
    figures = [
        Figure("Memorization vs duplication by method", "memorization_vs_duplication.png", plot_duplication(summaries))
    ]
    if results.get("varies_rank") and sum(s.lora_rank is not None for s in summaries) > 1:
        figures.append(Figure("Memorization vs LoRA rank", "memorization_vs_rank.png", plot_rank(summaries)))
    figures.append(Figure("Utility vs memorization", "utility_vs_memorization.png", plot_utility(summaries)))
    return figures


def experiment_document(results: Mapping[str, Any]) -> Document:
    """The report: what was run, the tables, the plots, then any failed runs."""
    intro = [str(results["description"]).strip()] if results.get("description") else []
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    intro += [f"- base model: `{results.get('base_model')}`; seeds: {seeds}", _PREAMBLE]
    failures = _failures(results)
    blocks: list[Table | Figure] = [*tables(results), *_figures(results, summarize(results))]
    if failures:
        blocks.append(Table(title="Failed runs", notes=tuple(failures)))
    return Document(
        title=f"Experiment `{results.get('experiment', 'experiment')}`", intro=tuple(intro), blocks=tuple(blocks)
    )


def write_experiment_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG plots, report.md and report.html into out_dir; return their paths."""
    return write_document(experiment_document(results), out_dir)
