"""Did each method learn, and what it memorized at one held-out loss: the experiment's utility-matched view.

Pure functions over results.json's payload, as summary.py's: a method whose best round does not beat
the base model did not learn and is not ranked; the others are compared at the audited round of each
run whose held-out loss is nearest the best loss they all reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from fedlora_lab.experiment.summary import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    FACTOR_METRICS,
    REFERENCE_MODE,
    Interval,
    ReductionFactor,
    finished_runs,
    mean_ci,
    method_runs,
    reduction_factor,
    result_methods,
    round_curves,
)

__all__ = ["Learning", "MatchedMethod", "MatchedRun", "MatchedUtility", "learning", "matched_utility"]


@dataclass(frozen=True)
class Learning:
    """A method's best held-out loss over its rounds (mean over seeds) against the base model's on the same data.

    ``learned`` is False when no round beat the base model: such a method is flagged "did not learn"
    and not ranked, since whatever it memorizes is not the price of anything useful.
    """

    name: str
    label: str
    best_loss: float | None
    base_loss: float | None

    @property
    def learned(self) -> bool:
        return self.best_loss is not None and self.base_loss is not None and self.best_loss < self.base_loss


def learning(results: Mapping[str, Any]) -> list[Learning]:
    """Per method (config order): its best mean held-out loss over rounds, and the base model's mean."""
    curves = {c.name: c for c in round_curves(results)}
    out = []
    for method in result_methods(results):
        losses = [p.eval_loss for p in curves[method["name"]].points if p.eval_loss is not None]
        base = mean_ci([r.get("base_eval_loss") for r in finished_runs(method_runs(results, method["name"]))]).mean
        out.append(Learning(method["name"], method.get("label") or method["name"], min(losses, default=None), base))
    return out


@dataclass(frozen=True)
class MatchedRun:
    """One run at its audited round whose held-out loss is closest to the common target."""

    seed: int
    round: int
    eval_loss: float
    exact_match_10x: float | None
    approx_match_10x: float | None
    exposure_10x: float | None
    canaries_10x: int | None


@dataclass(frozen=True)
class MatchedMethod:
    name: str
    label: str
    runs: tuple[MatchedRun, ...]
    factors: Mapping[str, ReductionFactor] | None
    """Against the reference at the same target loss (None for the reference itself, or without one)."""

    def interval(self, key: str) -> Interval:
        return mean_ci([getattr(r, key) for r in self.runs])


@dataclass(frozen=True)
class MatchedUtility:
    """Memorization of the methods that learned, each run taken at the audited round nearest ``target_loss``.

    The target is the best loss every such method reaches: the largest of their best mean losses. A
    method compared at its final round may simply have trained longer or harder than another; at
    one held-out loss the comparison is of what each paid in memorization for the same utility.
    """

    target_loss: float | None
    reference: str | None
    methods: tuple[MatchedMethod, ...]
    not_learned: tuple[str, ...]


_MATCHED_FIELDS: Final = {"exact_match_rate": "exact_match_10x", "approx_match_rate": "approx_match_10x"}
"""Each of FACTOR_METRICS as a round's curve names it (execute's ``rounds``)."""


def _matched_run(run: Mapping[str, Any], target: float) -> MatchedRun | None:
    audited = [
        r for r in run.get("rounds") or [] if r.get("eval_loss") is not None and r.get("exact_match_10x") is not None
    ]
    if not audited:
        return None
    best = min(audited, key=lambda r: (abs(float(r["eval_loss"]) - target), int(r["round"])))
    return MatchedRun(
        seed=int(run["seed"]),
        round=int(best["round"]),
        eval_loss=float(best["eval_loss"]),
        exact_match_10x=best.get("exact_match_10x"),
        approx_match_10x=best.get("approx_match_10x"),
        exposure_10x=best.get("exposure_10x"),
        canaries_10x=best.get("canaries_10x"),
    )


def matched_utility(
    results: Mapping[str, Any], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> MatchedUtility:
    """Each learned method's memorization at the common target loss, and its reduction factor against the first
    learned method in mode full, each (method, metric) bootstrapped from its own generator seeded with ``seed``."""
    learned = [m for m in learning(results) if m.learned]
    not_learned = tuple(m.label for m in learning(results) if not m.learned)
    if not learned:
        return MatchedUtility(None, None, (), not_learned)
    target = max(m.best_loss for m in learned if m.best_loss is not None)
    modes = {m["name"]: m.get("mode") for m in result_methods(results)}
    reference = next((m.name for m in learned if modes.get(m.name) == REFERENCE_MODE), None)
    matched = {
        m.name: tuple(
            run for r in finished_runs(method_runs(results, m.name)) if (run := _matched_run(r, target)) is not None
        )
        for m in learned
    }
    methods = []
    for m in learned:
        factors = None
        if reference is not None and m.name != reference:
            counts = [r.canaries_10x for r in matched[m.name]]
            trials = int(sum(c for c in counts if c is not None)) if counts and None not in counts else None
            factors = {
                metric: reduction_factor(
                    [getattr(r, _MATCHED_FIELDS[metric]) for r in matched[reference]],
                    [getattr(r, _MATCHED_FIELDS[metric]) for r in matched[m.name]],
                    trials=trials,
                    rng=np.random.default_rng(seed),
                    resamples=resamples,
                )
                for metric, _ in FACTOR_METRICS
            }
        methods.append(MatchedMethod(m.name, m.label, matched[m.name], factors))
    return MatchedUtility(target, reference, tuple(methods), not_learned)
