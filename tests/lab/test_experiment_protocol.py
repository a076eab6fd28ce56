"""The experiment's protocol: learning rates chosen by a sweep on a seed of their own by held-out loss alone,
methods that did not learn flagged, and memorization compared at one held-out loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fedlora_lab.experiment import PlannedRun, run_experiment, write_experiment_report
from fedlora_lab.experiment.config import ExperimentConfig
from fedlora_lab.experiment.matched import learning, matched_utility
from fedlora_lab.experiment.summary import BOOTSTRAP_SEED, reduction_factor
from fedlora_lab.experiment.sweep import choose_rates, plan_sweep, sweep_json, with_chosen_rates

FULL = {"name": "full", "mode": "full", "learning_rates": [1e-4, 3e-4, 1e-3]}
LORA = {"name": "lora", "mode": "lora", "learning_rates": [1e-3, 3e-3]}


def _config(**overrides: Any) -> ExperimentConfig:
    data: dict[str, Any] = {
        "model": {"lab": "tiny"},
        "seeds": [0, 1],
        "sweep_seed": 9,
        "federation": {"sites": 2, "rounds": 1, "local_steps": 1},
        "methods": [FULL, LORA, {"name": "fixed", "mode": "lora", "learning_rate": 5e-3}],
        **overrides,
    }
    return ExperimentConfig.model_validate(data)


# --------------------------------------------------------------------------- the sweep's settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sweep_seed": None}, "sweep_seed: required, full, lora sweep learning_rates"),
        ({"sweep_seed": 1}, "sweep_seed: 1 is a reported seed"),
        ({"methods": [{**LORA, "learning_rate": 3e-3}]}, "give learning_rate or learning_rates"),
        ({"methods": [{**LORA, "learning_rates": [1e-3, 1e-3]}]}, "must be distinct"),
        ({"methods": [{**LORA, "learning_rates": [1e-3, 1.5]}]}, "every learning rate must be in (0, 1)"),
    ],
)
def test_a_sweep_that_could_choose_on_reported_data_or_is_ambiguous_is_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(**overrides)


def test_every_swept_method_runs_at_each_of_its_rates_on_the_sweep_seed_only(tmp_path: Path) -> None:
    config = _config()

    cells = plan_sweep(config, tmp_path)

    assert [(c.method.name, c.method.learning_rate, c.seed) for c in cells] == [
        ("full", 1e-4, 9),
        ("full", 3e-4, 9),
        ("full", 1e-3, 9),
        ("lora", 1e-3, 9),
        ("lora", 3e-3, 9),
    ]
    assert len({c.out_dir for c in cells}) == len(cells)
    assert all(c.out_dir.is_relative_to(tmp_path / "sweep") for c in cells)
    # each cell is a run of its own: its fingerprint changes with the rate
    assert len({config.fingerprint(c.method, c.seed) for c in cells}) == len(cells)
    assert not any(c.audited for c in cells)  # the sweep sees held-out loss and nothing the audit measures


def test_a_sweep_run_federates_without_an_audit_and_its_result_keeps_the_experiments_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora_lab.experiment import execute
    from fedlora_lab.federation import FederationResult

    config = _config(audit={"every": 1, "second_frequency_penalty": 1.0})
    planned: list[dict[str, Any]] = []

    def federate(plan: Any, **_: Any) -> FederationResult:
        planned.append(plan.run)
        report = {"rounds": [{"round": 1, "eval_loss": 2.0}], "base_eval_loss": 2.5, "adapter_path": "adapter"}
        return FederationResult(out_dir=plan.out_dir, report=report, exit_codes={"coordinator": 0})

    def no_audit(*_: Any, **__: Any) -> None:
        raise AssertionError("a sweep run was audited")

    monkeypatch.setattr(execute, "run_federation", federate)
    monkeypatch.setattr(execute, "audit_site", no_audit)
    monkeypatch.setattr(execute, "_parameter_counts", lambda *_: {})
    cell = next(c for c in plan_sweep(config, tmp_path) if c.method.mode == "lora")

    result = execute.execute_run(config, cell, tmp_path / "base")

    assert result["status"] == "ok", result["error"]
    assert result["eval_loss"] == 2.0
    assert result["memorization"] is None
    assert "second_decoding" not in result
    assert "audit" not in planned[0]
    assert result["fingerprint"] == config.fingerprint(cell.method, cell.seed)  # so a resumed sweep keeps it
    with pytest.raises(AssertionError, match="audited"):  # the grid's runs at the same settings are audited
        execute.execute_run(config, PlannedRun(cell.method, 0, tmp_path / "grid"), tmp_path / "base")
    assert planned[1]["audit"]["every"] == 1


def _result(loss: float | None, *, ok: bool = True) -> dict[str, Any]:
    return {"status": "ok" if ok else "failed", "eval_loss": loss, "base_eval_loss": 2.5, "error": None if ok else "x"}


def test_the_rate_of_the_lowest_held_out_loss_is_chosen_and_a_method_without_a_finished_rate_gets_none(
    tmp_path: Path,
) -> None:
    config = _config()
    cells = plan_sweep(config, tmp_path)
    # full: 3e-4 best, 1e-3 failed (whatever loss it logged); lora: a tie goes to the smaller rate
    results = [_result(2.4), _result(2.2), _result(1.0, ok=False), _result(2.3), _result(2.3)]

    choices = choose_rates(cells, results)
    methods = {m.name: m for m in with_chosen_rates(config, choices)}

    assert choices["full"].learning_rate == 3e-4
    assert [c.error for c in choices["full"].cells] == [None, None, "x"]
    assert choices["lora"].learning_rate == 1e-3
    assert (methods["full"].learning_rate, methods["lora"].learning_rate, methods["fixed"].learning_rate) == (
        3e-4,
        1e-3,
        5e-3,
    )
    assert sweep_json(9, choices)["methods"]["full"]["chosen_learning_rate"] == 3e-4  # type: ignore[index]

    none_finished = choose_rates(cells[:3], [_result(None, ok=False)] * 3)
    assert none_finished["full"].learning_rate is None
    assert with_chosen_rates(config, none_finished)[0] == config.methods[0]


# --------------------------------------------------------------------------- did it learn; matched utility


def _run(method: str, seed: int, curve: list[tuple[float, float | None]], base: float = 2.5) -> dict[str, Any]:
    """A successful run whose round r (from 1) has held-out loss and 10x exact match curve[r - 1]."""
    return {
        "method": method,
        "seed": seed,
        "status": "ok",
        "base_eval_loss": base,
        "rounds": [
            {
                "round": r,
                "eval_loss": loss,
                "exact_match_10x": exact,
                "approx_match_10x": exact,
                "exposure_10x": None if exact is None else 6 * exact,
                "exposure_control": None,
                "canaries_10x": None if exact is None else 3,
            }
            for r, (loss, exact) in enumerate(curve, start=1)
        ],
    }


def _results() -> dict[str, Any]:
    # full learns fast and memorizes as it goes; lora reaches 2.3 at best; flat never beats the base model
    full = [[(2.4, 0.0), (2.3, 0.2 + 0.1 * s), (2.1, 1.0)] for s in range(3)]
    lora = [[(2.45, 0.0), (2.35, 0.0), (2.3, 0.1 * s)] for s in range(3)]
    flat = [[(2.6, 0.0), (2.55, 0.5), (2.5, 0.9)] for s in range(3)]
    runs = [
        _run(name, s, curve[s]) for name, curve in (("full", full), ("lora", lora), ("flat", flat)) for s in range(3)
    ]
    return {
        "methods": [
            {"name": "full", "label": "Full", "mode": "full"},
            {"name": "lora", "label": "LoRA", "mode": "lora"},
            {"name": "flat", "label": "Flat", "mode": "lora"},
        ],
        "runs": runs,
    }


def test_a_method_whose_best_held_out_loss_is_not_below_the_base_models_did_not_learn() -> None:
    found = {m.name: m for m in learning(_results())}

    assert found["full"].best_loss == pytest.approx(2.1)
    assert found["full"].learned
    assert found["lora"].learned
    assert found["flat"].best_loss == pytest.approx(2.5)  # equal to the base model's: not better
    assert not found["flat"].learned


def test_memorization_is_compared_at_the_loss_every_learned_method_reaches() -> None:
    matched = matched_utility(_results())
    by_name = {m.name: m for m in matched.methods}

    assert matched.target_loss == pytest.approx(2.3)  # lora's best; full passed it on the way to 2.1
    assert matched.not_learned == ("Flat",)
    assert matched.reference == "full"
    assert [r.round for r in by_name["full"].runs] == [2, 2, 2]
    assert [r.round for r in by_name["lora"].runs] == [3, 3, 3]
    full_exact, lora_exact = [0.2 + 0.1 * s for s in range(3)], [0.1 * s for s in range(3)]
    assert [r.exact_match_10x for r in by_name["full"].runs] == pytest.approx(full_exact)
    assert by_name["full"].factors is None
    factor = by_name["lora"].factors["exact_match_rate"]  # type: ignore[index]
    expected = reduction_factor(full_exact, lora_exact, trials=9, rng=np.random.default_rng(BOOTSTRAP_SEED))
    assert factor.factor == pytest.approx(3.0)
    assert (factor.low, factor.high, factor.trials) == (expected.low, expected.high, 9)


def test_without_a_learned_full_fine_tuning_there_is_a_target_but_no_factor() -> None:
    results = _results()
    results["runs"] = [r for r in results["runs"] if r["method"] != "full"]
    results["methods"] = results["methods"][1:]

    matched = matched_utility(results)

    assert matched.reference is None
    assert matched.target_loss == pytest.approx(2.3)
    assert all(m.factors is None for m in matched.methods)


def test_the_report_shows_the_sweep_flags_what_did_not_learn_and_compares_at_matched_utility(tmp_path: Path) -> None:
    results = {
        **_results(),
        "experiment": "protocol",
        "seeds": [0, 1, 2],
        "config": {"data": {"n_train": 100, "n_eval": 20, "n_canaries": 2, "frac_10x": 0.5, "n_controls": 2}},
        "sweep": {
            "seed": 9,
            "methods": {
                "lora": {
                    "chosen_learning_rate": 1e-3,
                    "cells": [
                        {"learning_rate": 1e-3, "eval_loss": 2.31, "base_eval_loss": 2.5, "error": None},
                        {"learning_rate": 3e-3, "eval_loss": None, "base_eval_loss": 2.5, "error": "diverged"},
                    ],
                }
            },
        },
    }
    for run in results["runs"]:
        run["eval_loss"] = run["rounds"][-1]["eval_loss"]

    write_experiment_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()

    assert "each site: 100 ordinary records, 2 canaries (1 of them 10x), 9.9% of its training lines" in report
    assert "Learning rates (sweep)" in report
    assert "| lora | 0.001 | 2.310 | 2.500 | chosen |" in report
    assert "| lora | 0.003 | failed: diverged | 2.500 |  |" in report
    assert "| Flat (did not learn) |" in report
    assert "| Flat | 2.500 | 2.500 | did not learn |" in report
    matched = report[report.index("Memorization at matched utility") :]
    assert "Target held-out loss 2.300" in matched
    assert "| LoRA | 3 | 2.300 ± 0.000 |" in matched
    assert "Not ranked (did not learn): Flat." in matched


# --------------------------------------------------------------------------- a second decoding


def test_a_second_decoding_must_differ_from_the_first() -> None:
    with pytest.raises(ValidationError, match="second_frequency_penalty: the same as frequency_penalty"):
        _config(audit={"frequency_penalty": 1.0, "second_frequency_penalty": 1.0})

    audit = _config(audit={"second_frequency_penalty": 1.0}).audit

    assert (audit.plan().frequency_penalty, audit.plan(1.0).frequency_penalty) == (0.0, 1.0)
    assert audit.run_section()["frequency_penalty"] == 0.0  # type: ignore[index]  # the rounds decode once


def _decoded(exact_10x: float) -> dict[str, Any]:
    groups = {"10x": {"exact_match_rate": exact_10x, "approx_match_rate": exact_10x, "count": 3}}
    return {"by_duplication": groups, "by_prefix": {}}


def test_the_report_puts_each_methods_extraction_under_both_decodings_side_by_side(tmp_path: Path) -> None:
    results = {**_results(), "experiment": "decoding", "config": {"audit": {"second_frequency_penalty": 1.0}}}
    for run in results["runs"]:
        run["memorization"] = _decoded(0.5 if run["method"] == "full" else 0.0)
        run["second_decoding"] = {
            "frequency_penalty": 1.0,
            "memorization": _decoded(0.25 if run["method"] == "full" else 0.0),
        }

    write_experiment_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()

    table = report[report.index("Extraction by decoding (frequency penalty)") :]
    assert "| method | exact 10x, penalty 0 | exact 10x, penalty 1 |" in table
    assert "| Full | 0.500 ± 0.000 | 0.250 ± 0.000 | — | — |" in table


# --------------------------------------------------------------------------- the runner: sweep, then grid


def test_the_grid_runs_each_method_at_the_rate_its_sweep_chose_and_a_method_without_one_is_not_run(
    tmp_path: Path,
) -> None:
    # Prepare: held-out loss is lowest at 3e-4 for full and at 3e-3 for lora; every sweep run of "broken" fails.
    base = tmp_path / "base"
    base.mkdir()
    broken = {"name": "broken", "mode": "lora", "learning_rates": [1e-3, 2e-3]}
    config = _config(model={"path": str(base)}, methods=[FULL, LORA, broken])
    best = {"full": 3e-4, "lora": 3e-3}
    calls: list[tuple[str, float, int]] = []

    def execute(cfg: ExperimentConfig, run: PlannedRun, base_model: Path) -> dict[str, Any]:
        name, rate = run.method.name, run.method.learning_rate
        calls.append((name, rate, run.seed))
        ok = name != "broken"
        loss = 2.0 + abs(math.log10(rate / best.get(name, 1.0)))
        synthetic = _run(name, run.seed, [(loss + 0.1, None), (loss, 0.5)])
        return {
            **synthetic,
            "status": "ok" if ok else "failed",
            "error": None if ok else "diverged",
            "eval_loss": loss,
            "duration_s": 1.0,
            "fingerprint": cfg.fingerprint(run.method, run.seed),
        }

    # Execute
    outcome = run_experiment(config, tmp_path / "out", cache_dir=tmp_path, show_progress=False, execute=execute)
    again = run_experiment(config, tmp_path / "out", cache_dir=tmp_path, show_progress=False, execute=execute)

    # Assert: the sweep ran first, on its seed only; the grid at the chosen rates; nothing twice (the second start
    # resumed everything but the failed sweep runs, tried again).
    assert sorted(calls[:7]) == sorted(
        [
            *(("full", rate, 9) for rate in (1e-4, 3e-4, 1e-3)),
            *(("lora", rate, 9) for rate in (1e-3, 3e-3)),
            *(("broken", rate, 9) for rate in (1e-3, 2e-3)),
        ]
    )
    grid = {(name, seed): rate for name, rate, seed in calls if seed != 9}
    assert grid == {("full", 0): 3e-4, ("full", 1): 3e-4, ("lora", 0): 3e-3, ("lora", 1): 3e-3}
    assert [c for c in calls[len(calls) - 2 :]] == [("broken", 1e-3, 9), ("broken", 2e-3, 9)]
    assert len(calls) == 7 + 4 + 2
    sweep = outcome.results["sweep"]
    assert {name: m["chosen_learning_rate"] for name, m in sweep["methods"].items()} == {
        "full": 3e-4,
        "lora": 3e-3,
        "broken": None,
    }
    assert [m["learning_rate"] for m in outcome.results["methods"]] == [3e-4, 3e-3, 3e-3]
    broken_runs = [r for r in again.results["runs"] if r["method"] == "broken"]
    assert [(r["status"], r["error"]) for r in broken_runs] == [
        ("failed", "no learning rate of the sweep finished")
    ] * 2
    assert "Learning rates (sweep)" in (tmp_path / "out" / "report.md").read_text()
