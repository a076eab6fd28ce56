"""The learning-rate sweep: each swept method trained at each of its rates on the sweep seed, before the grid.

A method's rate is chosen by held-out loss alone (the sweep seed's held-out records: a draw of the
same distribution that no reported seed trains or is scored on), never by anything the audit measures,
so the comparison of memorization cannot have been tuned for: the sweep's runs are not audited at all. The rate whose final held-out loss is
lowest wins; ties go to the smaller rate. A method none of whose rates finished has no rate, and its
grid runs are failed without being run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_lab.experiment.config import ExperimentConfig, MethodConfig
from fedlora_lab.experiment.execute import PlannedRun

__all__ = ["SweepCell", "SweepChoice", "choose_rates", "plan_sweep", "sweep_json", "with_chosen_rates"]


@dataclass(frozen=True)
class SweepCell:
    """One (method, rate) run of the sweep: its final held-out loss, or why it has none."""

    learning_rate: float
    eval_loss: float | None
    base_eval_loss: float | None
    error: str | None


@dataclass(frozen=True)
class SweepChoice:
    """A swept method's cells in rate order and the rate chosen (None: no cell finished)."""

    method: str
    learning_rate: float | None
    cells: tuple[SweepCell, ...]


def _cell_dir(out_dir: Path, method: MethodConfig, rate: float) -> Path:
    return out_dir / "sweep" / method.name / f"lr-{rate:g}"


def plan_sweep(config: ExperimentConfig, out_dir: Path) -> list[PlannedRun]:
    """Every swept method at each of its rates, on the sweep seed, in config order then rate order."""
    if config.sweep_seed is None:
        return []
    return [
        PlannedRun(method.at_rate(rate), config.sweep_seed, _cell_dir(out_dir, method, rate), audited=False)
        for method in config.methods
        if method.learning_rates is not None
        for rate in method.learning_rates
    ]


def _cell(run: PlannedRun, result: Mapping[str, Any]) -> SweepCell:
    ok = result.get("status") == "ok" and isinstance(result.get("eval_loss"), int | float)
    return SweepCell(
        learning_rate=run.method.learning_rate,
        eval_loss=float(result["eval_loss"]) if ok else None,
        base_eval_loss=result.get("base_eval_loss"),
        error=None if ok else (result.get("error") or "no held-out loss"),
    )


def choose_rates(runs: Sequence[PlannedRun], results: Sequence[Mapping[str, Any]]) -> dict[str, SweepChoice]:
    """Per swept method, the rate of its lowest final held-out loss (``results`` in the order of ``runs``)."""
    cells: dict[str, list[SweepCell]] = {}
    for run, result in zip(runs, results, strict=True):
        cells.setdefault(run.method.name, []).append(_cell(run, result))
    out = {}
    for name, found in cells.items():
        finished = [c for c in found if c.eval_loss is not None]
        best = min(finished, key=lambda c: (c.eval_loss, c.learning_rate), default=None)
        out[name] = SweepChoice(name, None if best is None else best.learning_rate, tuple(found))
    return out


def with_chosen_rates(config: ExperimentConfig, choices: Mapping[str, SweepChoice]) -> tuple[MethodConfig, ...]:
    """The methods the grid runs: each swept one at its chosen rate (a method without one stays as it is)."""
    return tuple(
        method.at_rate(rate)
        if (choice := choices.get(method.name)) is not None and (rate := choice.learning_rate) is not None
        else method
        for method in config.methods
    )


def sweep_json(seed: int | None, choices: Mapping[str, SweepChoice]) -> dict[str, Any] | None:
    """results.json's `sweep`: the seed, and per method its chosen rate and every cell."""
    if seed is None:
        return None
    return {
        "seed": seed,
        "selected_by": "final held-out loss on the sweep seed's held-out records",
        "methods": {
            name: {
                "chosen_learning_rate": choice.learning_rate,
                "cells": [
                    {
                        "learning_rate": c.learning_rate,
                        "eval_loss": c.eval_loss,
                        "base_eval_loss": c.base_eval_loss,
                        "error": c.error,
                    }
                    for c in choice.cells
                ],
            }
            for name, choice in choices.items()
        },
    }
