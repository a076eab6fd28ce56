"""`fedlora-lab experiment`: config validation, the confidence interval, the report, and one small run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedlora_common.memorization import AuditRates, AuditSummary, combine_summaries
from fedlora_lab.cli import main
from fedlora_lab.experiment import (
    ExperimentConfig,
    MethodConfig,
    PlannedRun,
    execute,
    format_interval,
    load_experiment_config,
    mean_ci,
    run_experiment,
    summarize,
    write_experiment_report,
)
from fedlora_lab.experiment.config import coordinator_settings, federation_plan
from fedlora_lab.experiment.execute import simulation_cores
from fedlora_lab.federation import FederationResult
from tests.lab_fixtures import SMALL_EXPERIMENT, ExperimentRun

REPO = Path(__file__).resolve().parents[2]
T_975_2DF = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom, from a table
ROUND_FIELDS = ("exact_match_10x", "approx_match_10x", "exposure_10x", "exposure_control")
PLOTS = (
    "memorization_vs_duplication.png",
    "memorization_vs_rank.png",
    "utility_vs_memorization.png",
    "memorization_vs_loss_by_round.png",
)


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _run_cli(tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["experiment", "--config", str(_write(tmp_path, config)), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- config


def test_unknown_key_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {**SMALL_EXPERIMENT, "federation": {**SMALL_EXPERIMENT["federation"], "epochs": 3}}

    code, err = _run_cli(tmp_path, config, capsys)

    assert code == 2
    assert "federation.epochs: unknown setting" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_method_mode_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {**SMALL_EXPERIMENT, "methods": [{"name": "sgd", "mode": "sgd"}]}

    code, err = _run_cli(tmp_path, config, capsys)

    assert code == 2
    assert "methods.0.mode" in err
    assert len(err.strip().splitlines()) == 1


def test_method_privacy_is_checked_by_the_run_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    method = {"name": "dp", "privacy": {"record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon": 3}}}
    config = {**SMALL_EXPERIMENT, "methods": [method]}

    code, err = _run_cli(tmp_path, config, capsys)

    assert code == 2
    assert "methods.0 (dp)" in err
    assert "privacy.record_dp.epsilon: unknown setting" in err


def test_repeated_method_names_are_refused() -> None:
    with pytest.raises(ValueError, match="repeated: lora"):
        ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "methods": [{"name": "lora"}, {"name": "lora"}]})


@pytest.mark.parametrize("every", [2, None])
def test_a_methods_aggregation_and_the_audit_reach_the_coordinators_settings(tmp_path: Path, every: int | None) -> None:
    audit = {"prefixes": [10, 50], "candidates": 8, "frequency_penalty": 1.0, "every": every}
    method = {**SMALL_EXPERIMENT["methods"][1], "aggregation": "ffa"}
    config = ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "audit": audit, "methods": [method]})

    plan = federation_plan(config, config.methods[0], 0, out_dir=tmp_path, base_model=tmp_path)
    settings = coordinator_settings(plan)

    assert settings.aggregation == "ffa"
    if every is None:
        assert settings.audit is None
    else:
        assert settings.audit is not None
        assert settings.audit.every == every
        assert settings.audit.plan() == config.audit.plan()
        assert settings.audit.plan().frequency_penalty == 1.0


def test_runs_are_simulated_unless_the_config_asks_for_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = ExperimentConfig.model_validate(SMALL_EXPERIMENT)
    processes = ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "engine": "processes"})
    method = default.methods[0]

    code, err = _run_cli(tmp_path, {**SMALL_EXPERIMENT, "engine": "threads"}, capsys)

    assert default.engine == "simulation"
    assert processes.engine == "processes"
    assert default.fingerprint(method, 0) != processes.fingerprint(method, 0)  # a stored result is redone
    assert code == 2
    assert "engine" in err
    assert len(err.strip().splitlines()) == 1


def test_simulated_runs_side_by_side_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)

    cores = [
        simulation_cores(ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "parallel": n})) for n in (1, 2, 3, 16)
    ]

    assert cores == [8, 4, 2, 1]


def test_shipped_configs_are_valid_and_vary_only_what_they_compare() -> None:
    paper = load_experiment_config(REPO / "experiments" / "paper.yaml")
    rank = load_experiment_config(REPO / "experiments" / "rank.yaml")
    gpu = load_experiment_config(REPO / "experiments" / "paper-gpu.yaml")

    assert len(paper.seeds) >= 5
    # issue 19's protocol: three sites, canaries a small share of a corpus, every rate chosen by a sweep
    for protocol in (paper, gpu):
        assert protocol.federation.sites == 3
        assert protocol.data.n_train >= 100
        assert protocol.data.spec(0).canary_share <= 0.10
        assert all(m.learning_rates is not None and len(m.learning_rates) >= 2 for m in protocol.methods)
        assert protocol.sweep_seed is not None
        assert protocol.sweep_seed not in protocol.seeds
        assert {protocol.audit.frequency_penalty, protocol.audit.second_frequency_penalty} == {0.0, 1.0}
    assert paper.audit.candidates >= 128
    assert paper.audit.second_frequency_penalty == 1.0
    assert len(rank.seeds) >= 3
    assert len(gpu.seeds) >= 3
    assert not any(m.secure_aggregation for m in paper.methods)  # secure aggregation is the one-seed check
    assert paper.secagg_check is not None
    assert paper.secagg_check.method == "lora"
    assert {m.mode for m in paper.methods} == {"full", "lora"}
    assert {m.aggregation for m in paper.methods} == {"fedavg", "ffa"}
    assert {(m.lora_rank, (m.lora or {}).get("alpha")) for m in paper.methods if m.mode == "lora"} == {(16, 8)}
    assert {m.mode for m in gpu.methods} == {"full", "qlora"}
    assert [m.lora_rank for m in rank.methods if m.mode == "lora"] == [4, 8, 16, 64]
    assert rank.varies_rank()
    assert not paper.varies_rank()
    assert (rank.federation, rank.data, rank.model) == (paper.federation, paper.data, paper.model)


# --------------------------------------------------------------------------- statistics


def test_mean_ci_matches_a_hand_computation() -> None:
    values = [1.0, 2.0, 4.0]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)

    interval = mean_ci(values)

    assert interval.n == 3
    assert interval.mean == pytest.approx(mean)
    assert interval.half_width == pytest.approx(T_975_2DF * sd / math.sqrt(3))
    assert format_interval(interval) == f"2.333 ± {T_975_2DF * sd / math.sqrt(3):.3f}"


def test_single_seed_has_no_interval() -> None:
    interval = mean_ci([0.5, None])

    assert interval.mean == 0.5
    assert interval.half_width is None
    assert format_interval(interval) == "0.500 (n=1)"
    assert format_interval(mean_ci([])) == "—"


def _rates(count: int, exact: float, worst: float | None = None, extrapolated: float | None = None) -> AuditRates:
    return AuditRates(
        count=count,
        pii_secrets=4 * count,
        exposure_count=count,
        exact_match_rate=exact,
        approx_match_rate=exact,
        token_accuracy=exact,
        mean_longest_prefix=None,
        pii_extraction_rate=0.0,
        mean_exposure=None,
        mean_exposure_extrapolated=extrapolated,
        max_token_accuracy=None,
        longest_prefix_max=None,
        worst_exposure=worst,
        worst_exposure_extrapolated=extrapolated,
    )


def test_memorization_is_merged_over_sites_by_count() -> None:
    clinical = AuditSummary(
        by_duplication={"10x": _rates(9, 1.0, worst=5.0), "1x": _rates(21, 2 / 7), "control": _rates(2, 0.0)},
        by_prefix={},
        records={"control": 2, "1x": 20, "10x": 10},
    )
    legal = AuditSummary(
        by_duplication={"10x": _rates(3, 0.0, worst=7.0), "1x": _rates(7, 0.0), "control": _rates(2, 0.5)},
        by_prefix={},
        records={"control": 2, "1x": 5, "10x": 5},
    )

    merged = combine_summaries([clinical, legal])

    assert clinical.overall.exact_match_rate == pytest.approx(0.5)  # 15 of its 30 trained canaries (9 + 6)
    assert merged.overall.exact_match_rate == pytest.approx(0.5 * 30 / 40)
    assert merged.by_duplication["10x"].exact_match_rate == pytest.approx(0.75)
    assert merged.by_duplication["10x"].worst_exposure == 7.0
    assert merged.by_duplication["10x"].count == 12
    assert merged.by_duplication["10x"].pii_secrets == 48
    assert merged.by_duplication["10x"].mean_exposure is None  # never measured: not averaged as 0
    assert merged.by_duplication["control"].exact_match_rate == pytest.approx(0.25)
    assert merged.records == {"control": 4, "1x": 25, "10x": 15}


# --------------------------------------------------------------------------- report


def _synthetic_run(method: str, seed: int, rank: int | None, exact_10x: float, ok: bool = True) -> dict[str, Any]:
    groups = {
        group: {
            "exact_match_rate": rate,
            "approx_match_rate": rate,
            "token_accuracy": 0.1 + rate,
            "pii_extraction_rate": rate / 2,
            "mean_exposure": 1.0 + 4 * rate,
            "mean_exposure_extrapolated": 1.0 + 20 * rate,
            "count": 10,
        }
        for group, rate in (("control", 0.0), ("1x", 0.0), ("10x", exact_10x))
    }
    curve = [  # round 1 not audited, round 2 audited
        {"round": 1, "eval_loss": 2.4 + 0.1 * seed, **dict.fromkeys(ROUND_FIELDS)},
        {
            "round": 2,
            "eval_loss": 2.0 + 0.1 * seed,
            "exact_match_10x": exact_10x,
            "approx_match_10x": exact_10x,
            "exposure_10x": 1.0 + 4 * exact_10x,
            "exposure_control": 1.0,
        },
    ]
    return {
        "method": method,
        "seed": seed,
        "status": "ok" if ok else "failed",
        "error": None if ok else "processes failed: {'legal': 1}",
        "lora_rank": rank,
        "aggregation": "fedavg",
        "trainable_fraction": 1.0 if rank is None else rank / 1000,
        "eval_loss": 2.0 + 0.1 * seed,
        "perplexity": math.exp(2.0 + 0.1 * seed),
        "base_eval_loss": 2.5,
        "epsilon": None,
        "upload_bytes": 2**20,
        "download_bytes": 2**21,
        "duration_s": 60.0,
        "rounds": curve if ok else [],
        "memorization": {"by_duplication": groups, "by_prefix": {"10": groups, "50": groups}} if ok else None,
    }


def _synthetic_results() -> dict[str, Any]:
    runs = [_synthetic_run("full", s, None, 0.5 + 0.1 * s) for s in range(3)]
    runs += [_synthetic_run("lora-r4", s, 4, 0.0) for s in range(3)]
    runs += [_synthetic_run("lora-r16", 0, 16, 0.1), _synthetic_run("lora-r16", 1, 16, 0.0, ok=False)]
    return {
        "experiment": "synthetic",
        "base_model": "lab",
        "seeds": [0, 1, 2],
        "varies_rank": True,
        "methods": [
            {"name": "full", "label": "Full fine-tuning", "mode": "full", "lora_rank": None},
            {"name": "lora-r4", "label": "LoRA r=4", "mode": "lora", "lora_rank": 4},
            {"name": "lora-r16", "label": "LoRA r=16", "mode": "lora", "lora_rank": 16},
        ],
        "runs": runs,
    }


def test_summary_averages_successful_runs_only() -> None:
    summaries = {s.name: s for s in summarize(_synthetic_results())}

    assert summaries["full"].metrics["exact_match_rate.10x"].mean == pytest.approx(0.6)
    assert summaries["full"].metrics["mib_moved"].mean == pytest.approx(3.0)
    assert (summaries["lora-r16"].ok, summaries["lora-r16"].runs) == (1, 2)
    assert summaries["lora-r16"].metrics["eval_loss"].half_width is None


def test_report_from_synthetic_results_has_the_tables_and_the_plots(tmp_path: Path) -> None:
    results = _synthetic_results()
    expected_full_10x = format_interval(mean_ci([0.5, 0.6, 0.7]))

    written = write_experiment_report(results, tmp_path)

    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert {p.name for p in written} == {*PLOTS, "report.md", "report.html"}
    for png in PLOTS:
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
        assert f"]({png})" in markdown
    assert "| method | control | 1x | 10x |" in markdown
    assert f"| Full fine-tuning | 0.000 ± 0.000 | 0.000 ± 0.000 | {expected_full_10x} |" in markdown
    assert "| LoRA r=16 | 1/2 |" in markdown
    exposures = [mean_ci([1 + 4 * r for r in (0.5, 0.6, 0.7)]), mean_ci([1.0] * 3)]
    exposures += [mean_ci([1 + 20 * r for r in (0.5, 0.6, 0.7)]), mean_ci([1.0] * 3)]
    columns = ("exposure 10x", "exposure control", "extrapolated exposure 10x", "extrapolated exposure control")
    assert "| " + " | ".join(f"{c} (bits)" for c in columns) + " |" in markdown
    assert "| " + " | ".join(format_interval(e, 2) for e in exposures) + " |" in markdown
    assert "## Mean extrapolated exposure (bits), by duplication" in markdown
    assert "lora-r16 seed 1: processes failed" in markdown
    assert "<table>" in page
    assert "<th>10x</th>" in page
    assert page.count("<img") == len(PLOTS)
    assert f"<td>{expected_full_10x}</td>" in page


# --------------------------------------------------------------------------- runs


def test_a_failed_run_is_recorded_and_the_others_still_run(
    tmp_path: Path, lab_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "seeds": [0, 1]})
    calls: list[str] = []

    def execute(cfg: ExperimentConfig, spec: PlannedRun, base: Path) -> dict[str, Any]:
        calls.append(spec.key)
        ok = spec.key != "full/seed-0"
        run = _synthetic_run(spec.method.name, spec.seed, spec.method.lora_rank, 0.2, ok=ok)
        return {**run, "fingerprint": cfg.fingerprint(spec.method, spec.seed), "exit_codes": {"legal": 0 if ok else 1}}

    outcome = run_experiment(config, tmp_path / "out", cache_dir=lab_cache, show_progress=False, execute=execute)
    again = run_experiment(config, tmp_path / "out", cache_dir=lab_cache, show_progress=False, execute=execute)

    assert sorted(calls[:4]) == ["full/seed-0", "full/seed-1", "lora/seed-0", "lora/seed-1"]
    assert calls[4:] == ["full/seed-0"]  # resumed: only the failed run is tried again
    assert [r["status"] for r in outcome.results["runs"]] == ["failed", "ok", "ok", "ok"]
    assert outcome.failed[0]["exit_codes"] == {"legal": 1}
    assert len(again.failed) == 1
    assert (tmp_path / "out" / "report.md").exists()


@pytest.mark.slow
def test_small_experiment_runs_end_to_end(small_experiment: ExperimentRun) -> None:
    out = small_experiment.out

    assert small_experiment.code == 0, small_experiment.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [(r["method"], r["seed"], r["status"]) for r in results["runs"]] == [("full", 0, "ok"), ("lora", 0, "ok")]
    for run in results["runs"]:
        assert math.isfinite(run["eval_loss"])
        assert run["perplexity"] == pytest.approx(math.exp(run["eval_loss"]))
        assert run["upload_bytes"] > 0
        assert set(run["memorization_by_site"]) == {"clinical", "legal"}
        assert set(run["memorization"]["by_duplication"]) == {"control", "1x", "10x"}
        assert run["memorization"]["by_duplication"]["10x"]["count"] == 2 * 2
        assert [r["round"] for r in run["rounds"]] == [1]
        assert run["rounds"][0]["eval_loss"] == run["eval_loss"]
        assert run["aggregation"] == "fedavg"
    full, lora = results["runs"]
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"] == full["total_parameters"]
    assert lora["trainable_fraction"] == lora["trainable_parameters"] / lora["total_parameters"]
    assert (out / "runs" / "lora" / "seed-0" / "result.json").exists()
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Utility and cost" in markdown
    assert "| lora | 1/1 |" in markdown
    assert "<table>" in (out / "report.html").read_text(encoding="utf-8")
    assert MethodConfig.model_validate(SMALL_EXPERIMENT["methods"][1]).lora_rank == 4


def test_a_run_keeps_each_groups_extrapolated_exposure_from_its_final_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a federation that finished, and audits whose extrapolation differs by site.
    config = ExperimentConfig.model_validate(SMALL_EXPERIMENT)
    finished = FederationResult(out_dir=tmp_path, report={"adapter_path": "final"}, exit_codes={"coordinator": 0})
    clinical = {"10x": _rates(1, 1.0, extrapolated=20.0), "control": _rates(2, 0.0, extrapolated=1.0)}
    legal = {"10x": _rates(3, 0.0, extrapolated=4.0), "control": _rates(2, 0.0, extrapolated=2.0)}
    audits = {
        site: AuditSummary(groups, by_prefix={}, records={})
        for site, groups in (("clinical", clinical), ("legal", legal))
    }
    monkeypatch.setattr(execute, "run_federation", lambda *args, **kwargs: finished)
    monkeypatch.setattr(execute, "audit_site", lambda run_dir, site, *args: audits[site])

    # Execute
    result = execute.execute_run(config, PlannedRun(config.methods[1], 0, tmp_path / "run"), tmp_path)

    # Assert: combined over the sites, weighted by the exposures each measured.
    groups = result["memorization"]["by_duplication"]
    assert result["status"] == "ok"
    assert groups["10x"]["mean_exposure_extrapolated"] == pytest.approx((20.0 + 3 * 4.0) / 4)
    assert groups["10x"]["worst_exposure_extrapolated"] == 20.0
    assert groups["control"]["mean_exposure_extrapolated"] == pytest.approx(1.5)
    assert result["memorization_by_site"]["legal"]["by_duplication"]["10x"]["worst_exposure_extrapolated"] == 4.0


def test_a_federation_that_fails_early_is_a_failed_run_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ExperimentConfig.model_validate(SMALL_EXPERIMENT)
    failed = FederationResult(out_dir=tmp_path, report={}, exit_codes={"coordinator": 1})
    monkeypatch.setattr(execute, "run_federation", lambda *args, **kwargs: failed)

    result = execute.execute_run(config, PlannedRun(config.methods[0], 0, tmp_path / "run"), tmp_path)

    assert result["status"] == "failed"
    assert result["error"] == "processes failed: {'coordinator': 1}"
    assert "trainable_parameters" not in result
