"""The experiment's plots: memorization by duplication, by LoRA rank, utility against memorization, and
memorization against held-out loss round by round."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from fedlora_lab.experiment.summary import GROUPS, Interval, MethodSummary, RoundCurve, mean_ci
from fedlora_server.document import figure_png, new_figure

__all__ = ["plot_duplication", "plot_rank", "plot_rounds", "plot_utility"]


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


_ROUND_PANELS: Final = (
    ("exact_match_10x", "exact match rate, 10x canaries"),
    ("exposure_10x", "mean exposure of 10x canaries (bits)"),
)


def plot_rounds(curves: Sequence[RoundCurve]) -> bytes:
    """Memorization of the 10x canaries against held-out loss, one marker per round, a line per method.

    Each point is the mean over seeds at that round, labelled with the round's number (a method that
    overfits moves to higher loss as it trains); lower loss is to the right, and methods are compared
    at equal loss rather than at equal round.
    """
    fig = new_figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, _ROUND_PANELS, strict=True):
        for curve in curves:
            points = [(p.round, p.eval_loss, getattr(p, key)) for p in curve.points]
            measured = [(r, x, y) for r, x, y in points if x is not None and y is not None]
            if measured:
                (line,) = ax.plot(
                    [x for _, x, _ in measured], [y for _, _, y in measured], marker="o", label=curve.label
                )
                for number, x, y in measured:
                    ax.annotate(
                        str(number),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=line.get_color(),
                    )
        ax.invert_xaxis()
        ax.set(title=title, xlabel="held-out loss, nats/token (lower to the right)")
    controls = mean_ci([p.exposure_control for c in curves for p in c.points]).mean
    if controls is not None:
        axes[1].axhline(controls, color="grey", linestyle="--", label="controls (mean)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Memorization vs held-out loss, round by round (mean over seeds)")
    return figure_png(fig)
