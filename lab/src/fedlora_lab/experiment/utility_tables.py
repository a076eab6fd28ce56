"""The report's tables on utility as the protocol fixes it: the learning-rate sweep, and memorization at one loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora_lab.experiment.matched import learning, matched_utility
from fedlora_lab.experiment.summary import BOOTSTRAP_RESAMPLES, FACTOR_METRICS, format_factor, format_interval
from fedlora_server.document import Table

__all__ = ["learning_table", "matched_table", "not_learned", "sweep_table"]


def not_learned(results: Mapping[str, Any]) -> set[str]:
    """Names of the methods whose best held-out loss never beat the base model's."""
    return {m.name for m in learning(results) if not m.learned}


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def sweep_table(results: Mapping[str, Any]) -> Table | None:
    """Every (method, rate) of the sweep with its final held-out loss; the chosen rate marked."""
    sweep = results.get("sweep")
    if not isinstance(sweep, Mapping):
        return None
    rows = []
    for name, method in sweep["methods"].items():
        for cell in method["cells"]:
            chosen = cell["learning_rate"] == method["chosen_learning_rate"]
            rows.append(
                (
                    name,
                    f"{cell['learning_rate']:g}",
                    _loss(cell["eval_loss"]) if cell["error"] is None else f"failed: {cell['error']}",
                    _loss(cell["base_eval_loss"]),
                    "chosen" if chosen else "",
                )
            )
    return Table(
        title="Learning rates (sweep)",
        columns=("method", "learning rate", "final held-out loss", "base model", ""),
        rows=tuple(rows),
        notes=(
            f"Each swept method trained at each rate on seed {sweep['seed']}, which is not a reported seed: its "
            "data and held-out records are a draw of their own. The rate with the lowest final held-out loss "
            "was chosen for every reported seed; nothing the audit measures entered the choice.",
        ),
    )


def learning_table(results: Mapping[str, Any]) -> Table:
    """Whether each method learned: its best mean held-out loss over rounds against the base model's."""
    rows = tuple(
        (m.label, _loss(m.best_loss), _loss(m.base_loss), "yes" if m.learned else "did not learn")
        for m in learning(results)
    )
    return Table(
        title="Did it learn?",
        columns=("method", "best held-out loss (mean over seeds)", "base model", "learned"),
        rows=rows,
        notes=(
            "A method whose best round is not below the base model's held-out loss did not learn anything the "
            "held-out records reward; it is flagged and not ranked, whatever it memorized.",
        ),
    )


def matched_table(results: Mapping[str, Any]) -> Table | None:
    """Each learned method's memorization at the round nearest the loss every learned method reaches."""
    matched = matched_utility(results)
    if matched.target_loss is None:
        return None
    rows = []
    for method in matched.methods:
        rounds = sorted({r.round for r in method.runs})
        rows.append(
            (
                method.label,
                ", ".join(str(r) for r in rounds) or "—",
                format_interval(method.interval("eval_loss")),
                format_interval(method.interval("exact_match_10x")),
                format_interval(method.interval("approx_match_10x")),
                format_interval(method.interval("exposure_10x"), 2),
                *(
                    "reference" if method.factors is None else format_factor(method.factors[metric])
                    for metric, _ in FACTOR_METRICS
                ),
            )
        )
    reference = next((m.label for m in matched.methods if m.name == matched.reference), None)
    notes = [
        f"Target held-out loss {matched.target_loss:.3f}: the best (mean over seeds) that every method that learned "
        "reaches. Each run is taken at its audited round whose held-out loss is closest to it, so each method is "
        "compared at the same utility rather than after the same number of rounds.",
        f"Reduction factor against {reference}: the same estimator and {BOOTSTRAP_RESAMPLES:,}-resample bootstrap "
        "as at the final round, over the matched rounds."
        if reference
        else "No full fine-tuning method learned: no reduction factor.",
    ]
    if matched.not_learned:
        notes.append(f"Not ranked (did not learn): {', '.join(matched.not_learned)}.")
    return Table(
        title="Memorization at matched utility",
        columns=(
            "method",
            "rounds",
            "held-out loss",
            "exact match 10x",
            "approx match 10x",
            "exposure 10x (bits)",
            *(f"factor, {title}" for _, title in FACTOR_METRICS),
        ),
        rows=tuple(rows),
        notes=tuple(notes),
    )
