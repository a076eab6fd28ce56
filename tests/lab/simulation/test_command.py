"""`fedlora-lab simulate` and `fedlora-lab demo --engine simulation`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedlora_lab.cli import main
from fedlora_lab.model_factory import MadeModel
from tests.lab.simulation.conftest import small_plan, written


def _simulate(run_yaml: Path, sites: list[Path], *flags: str) -> int:
    return main(["simulate", "--config", str(run_yaml), "--sites", *map(str, sites), "--threads", "1", *flags])


def test_a_run_simulates_from_the_programs_configs_with_run_flags_over_run_yaml(
    tmp_path: Path, lab_model: MadeModel, capsys: pytest.CaptureFixture[str]
) -> None:
    run_yaml, sites = written(small_plan(tmp_path / "out", lab_model.path, workers=2, rounds=2))

    code = _simulate(run_yaml, sites, "--rounds", "1")

    captured = capsys.readouterr()
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert code == 0, captured.err
    assert captured.out.startswith("# FedLoRA run")
    assert [r["round"] for r in report["rounds"]] == [1]
    assert (out / "adapter" / "adapter_config.json").exists()
    events = [json.loads(line)["event"] for line in (out / "logs" / "simulation.log").read_text().splitlines()]
    assert "round_committed" in events
    assert events[-1] == "simulation_finished"


def test_a_site_the_run_does_not_admit_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    run_yaml, sites = written(small_plan(tmp_path / "out", base, workers=2))
    stranger = yaml.safe_load(sites[1].read_text(encoding="utf-8"))
    (tmp_path / "token").write_text("not-on-the-list", encoding="utf-8")
    stranger["token_file"] = str(tmp_path / "token")
    sites[1].write_text(yaml.safe_dump(stranger), encoding="utf-8")

    code = _simulate(run_yaml, sites)

    err = capsys.readouterr().err
    assert code == 2
    assert "site legal: not admitted by the run's workers list" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "coordinator.db").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (["--rounds", "0"], "rounds"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--cores", "0"], "--cores must be >= 1"),
    ],
)
def test_a_wrong_flag_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: list[str], message: str
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    run_yaml, sites = written(small_plan(tmp_path / "out", base, workers=2))

    code = main(["simulate", "--config", str(run_yaml), "--sites", *map(str, sites), *edit])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_other_commands_still_refuse_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["make-data", "x", "--domain", "legal", "--rounds", "2"])

    assert exited.value.code == 2
    assert "unrecognized arguments: --rounds 2" in capsys.readouterr().err


def test_the_demo_on_the_simulation_engine_leaves_the_demo_s_files(
    tmp_path: Path, lab_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--engine", "simulation", "--out", str(out), "--rounds", "1", "--workers", "2"]
    argv += ["--local-steps", "2", "--records", "12", "--canaries", "2", "--controls", "1", "--audit-every", "0"]

    code = main([*argv, "--model-size", "tiny", "--cache-dir", str(lab_cache)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| round |" in captured.out
    assert {"base-model", "adapter", "report.json", "report.md", "report.html", "run.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "logs" / "simulation.log").stat().st_size > 0
    assert sorted(p.parent.name for p in (out / "sites").glob("*/worker.yaml")) == ["clinical", "legal"]
