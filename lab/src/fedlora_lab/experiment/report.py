"""The experiment's report: results.json -> report.md and report.html with PNG plots.

The tables (mean ± 95% confidence interval across seeds; each method's reduction factor against
full fine-tuning, with a bootstrap interval) and plots of ``summary`` and ``plots``, as one
``fedlora_server.document.Document``; failed runs are listed, never averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from fedlora_lab.datagen import DataSpec
from fedlora_lab.experiment.plots import plot_duplication, plot_rank, plot_rounds, plot_utility
from fedlora_lab.experiment.summary import (
    BOOTSTRAP_RESAMPLES,
    FACTOR_METRICS,
    GROUPS,
    MEMORIZATION_METRICS,
    Interval,
    MethodSummary,
    audited_prefixes,
    format_factor,
    format_interval,
    mean_ci,
    reduction_factors,
    round_curves,
    summarize,
)
from fedlora_lab.experiment.utility_tables import learning_table, matched_table, not_learned, sweep_table
from fedlora_server.document import Document, Figure, Table, write_document

__all__ = ["experiment_document", "tables", "write_experiment_report"]


def _cell(summary: MethodSummary, key: str, digits: int = 3) -> str:
    return format_interval(summary.metrics.get(key, Interval(None, None, 0)), digits)


def _base_loss(results: Mapping[str, Any], *, exp: bool = False) -> str:
    """The base model's held-out loss (or perplexity); it differs across seeds only by the data."""
    losses = [run.get("base_eval_loss") for run in results.get("runs", []) if run.get("status") == "ok"]
    values = [math.exp(v) if exp else v for v in losses if isinstance(v, int | float) and v < 700]
    return format_interval(mean_ci(values), 2 if exp else 3)


def _percent(interval: Interval) -> str:
    """A run's trainable share of the base, the same at every seed: its mean alone."""
    return "—" if interval.mean is None else f"{100 * interval.mean:.3g}%"


def _main_table(summaries: list[MethodSummary], flagged: set[str]) -> Table:
    """The comparison at a glance: what each method trains and how, what it memorizes, what it costs in utility."""
    rows = tuple(
        (
            f"{s.label} (did not learn)" if s.name in flagged else s.label,
            s.aggregation or "—",
            _percent(s.metrics.get("trainable_fraction", Interval(None, None, 0))),
            f"{s.ok}/{s.runs}",
            _cell(s, "exact_match_rate.10x"),
            _cell(s, "approx_match_rate.10x"),
            _cell(s, "exact_match_rate.control"),
            _cell(s, "mean_exposure.10x", 2),
            _cell(s, "mean_exposure.control", 2),
            _cell(s, "mean_exposure_extrapolated.10x", 2),
            _cell(s, "mean_exposure_extrapolated.control", 2),
            _cell(s, "eval_loss"),
            _cell(s, "epsilon", 2),
        )
        for s in summaries
    )
    columns = (
        "method",
        "aggregation",
        "trainable %",
        "runs ok",
        "exact match 10x",
        "approx match 10x",
        "exact match control",
        "exposure 10x (bits)",
        "exposure control (bits)",
        "extrapolated exposure 10x (bits)",
        "extrapolated exposure control (bits)",
        "held-out loss",
        "epsilon",
    )
    return Table(title="Main results", columns=columns, rows=rows)


def _factor_table(results: Mapping[str, Any], flagged: set[str]) -> Table | None:
    """Each method's reduction factor against full fine-tuning at the final round; None without a full
    fine-tuning method. A method that did not learn (or a reference that did not) is not ranked."""
    factors = reduction_factors(results)
    if not factors:
        return None
    notes = (
        f"How many times fewer 10x canaries a method gives back than {factors[0].reference}: the reference's "
        "mean rate over its seeds divided by the method's. In brackets a 95% percentile bootstrap interval "
        f"({BOOTSTRAP_RESAMPLES:,} resamples of each method's seeds, with replacement and independently, "
        "from a fixed seed); ∞ where resamples of the method extracted nothing. 'n=1': a single seed on one "
        "side, no interval.",
        "'> X (0 of N)': the method extracted none of the N 10x canaries audited over its seeds, so the "
        "factor is unbounded; X is the factor against 3/N, the rule of three's 95% upper bound on its rate.",
    )
    reference = next(m["name"] for m in results.get("methods", []) if m.get("mode") == "full")
    rows = tuple(
        (
            f.label,
            f"{f.factors[FACTOR_METRICS[0][0]].n_reference}, {f.factors[FACTOR_METRICS[0][0]].n_method}",
            *(
                "did not learn" if flagged & {f.name, reference} else format_factor(f.factors[metric])
                for metric, _ in FACTOR_METRICS
            ),
        )
        for f in factors
    )
    return Table(
        title="Reduction factor (full / method)",
        columns=("method", "seeds (full, method)", *(title for _, title in FACTOR_METRICS)),
        rows=rows,
        notes=notes,
    )


def tables(results: Mapping[str, Any]) -> list[Table]:
    """The main table, reduction factors, utility and cost, each memorization metric by duplication, and
    exposure and exact match by prefix."""
    summaries = summarize(results)
    prefixes = audited_prefixes(results)
    flagged = not_learned(results)
    factor = _factor_table(results, flagged)
    protocol = [t for t in (sweep_table(results), learning_table(results), matched_table(results)) if t is not None]
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
        _main_table(summaries, flagged),
        *([factor] if factor else []),
        *protocol,
        Table(
            title="Utility and cost",
            columns=("method", "runs ok", "held-out loss", "perplexity", "epsilon", "MiB moved", "minutes"),
            rows=tuple(utility),
        ),
    ]
    decoding = _decoding_table(results, summaries)
    if decoding is not None:
        out.append(decoding)
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


def _decoding_table(results: Mapping[str, Any], summaries: list[MethodSummary]) -> Table | None:
    """The final audit's extraction under both decodings, when the experiment decoded twice."""
    audit = (results.get("config") or {}).get("audit") or {}
    second = audit.get("second_frequency_penalty")
    if second is None:
        return None
    first = audit.get("frequency_penalty", 0.0)
    rows = tuple(
        (
            s.label,
            *(
                _cell(s, f"{prefix}{metric}.{group}")
                for metric in ("exact_match_rate", "approx_match_rate")
                for group in ("10x", "control")
                for prefix in ("", "second_decoding.")
            ),
        )
        for s in summaries
    )
    columns = tuple(
        f"{title} {group}, penalty {penalty:g}"
        for title in ("exact", "approx")
        for group in ("10x", "control")
        for penalty in (first, second)
    )
    return Table(
        title="Extraction by decoding (frequency penalty)",
        columns=("method", *columns),
        rows=rows,
        notes=(
            f"The final audit decoded greedily with frequency penalty {first:g}, then again with {second:g} (the "
            "paper's released code). A penalty discourages repeating tokens already generated, so a memorized "
            "record that repeats its own phrases can be harder to extract with it; exposure does not decode and "
            "is the same under both.",
        ),
    )


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


def _secagg_check(results: Mapping[str, Any]) -> Table | None:
    """results.json's ``secagg_check``, when the experiment made one, as it is."""
    check = results.get("secagg_check")
    if not isinstance(check, Mapping):
        return None

    def cell(key: str) -> str:
        value = check.get(key)
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    keys = ("method", "seed", "rounds_compared", "max_abs_diff", "bound", "within_bound")
    return Table(
        title="Secure aggregation check",
        columns=("method", "seed", "rounds compared", "max abs difference", "bound", "within bound"),
        rows=(tuple(cell(key) for key in keys),),
    )


_ROUNDS_NOTE: Final = (
    "Each marker is one audited round (mean over seeds), labelled with its number and placed at that round's "
    "held-out loss (lower to the right; a method that overfits moves left as it trains). Compare methods at "
    "equal held-out loss: at the same utility, the lower curve memorizes less."
)


def _figures(results: Mapping[str, Any], summaries: list[MethodSummary]) -> list[Table | Figure]:
    figures: list[Table | Figure] = [
        Figure("Memorization vs duplication by method", "memorization_vs_duplication.png", plot_duplication(summaries))
    ]
    if results.get("varies_rank") and sum(s.lora_rank is not None for s in summaries) > 1:
        figures.append(Figure("Memorization vs LoRA rank", "memorization_vs_rank.png", plot_rank(summaries)))
    figures.append(Figure("Utility vs memorization", "utility_vs_memorization.png", plot_utility(summaries)))
    curves = round_curves(results)
    if any(p.eval_loss is not None and p.exact_match_10x is not None for c in curves for p in c.points):
        figures += [
            Table(title="Memorization vs held-out loss, round by round", notes=(_ROUNDS_NOTE,)),
            Figure("Memorization vs held-out loss by round", "memorization_vs_loss_by_round.png", plot_rounds(curves)),
        ]
    return figures


def _data_line(data: Mapping[str, Any]) -> str:
    """What a site trains on: ordinary records, canaries, and the canaries' share of its training lines."""
    spec = DataSpec(**data)
    return (
        f"- each site: {spec.n_train} ordinary records, {spec.n_canaries} canaries ({spec.n_10x} of them 10x), "
        f"{spec.canary_share:.1%} of its training lines canary copies; {spec.n_eval} held-out records drawn like "
        f"the ordinary ones; {spec.n_controls} never-trained controls"
    )


def experiment_document(results: Mapping[str, Any]) -> Document:
    """The report: what was run, the tables, the plots, then any failed runs."""
    intro = [str(results["description"]).strip()] if results.get("description") else []
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    intro.append(f"- base model: `{results.get('base_model')}`; seeds: {seeds}")
    data = results.get("config", {}).get("data")
    intro += [*([_data_line(data)] if isinstance(data, Mapping) else []), _PREAMBLE]
    failures = _failures(results)
    check = _secagg_check(results)
    blocks: list[Table | Figure] = [
        *tables(results),
        *([check] if check else []),
        *_figures(results, summarize(results)),
    ]
    if failures:
        blocks.append(Table(title="Failed runs", notes=tuple(failures)))
    return Document(
        title=f"Experiment `{results.get('experiment', 'experiment')}`", intro=tuple(intro), blocks=tuple(blocks)
    )


def write_experiment_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG plots, report.md and report.html into out_dir; return their paths."""
    return write_document(experiment_document(results), out_dir)
