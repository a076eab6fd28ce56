"""The simulation engine: sites checked like the coordinator's door, a whole run in process, sites at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlora_common.plans import RunSpec
from fedlora_common.settings import load_settings
from fedlora_lab.model_factory import MadeModel
from fedlora_lab.simulation import Simulation, SimulationError, check_sites, side_by_side
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from fedlora_worker.distributed import train_in_process
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model
from fedlora_worker.training import TrainResult
from tests.lab.simulation.conftest import small_plan, written


def _configs(tmp_path: Path, base: Path, **run: object) -> tuple[RunSettings, list[WorkerSettings]]:
    run_yaml, sites = written(small_plan(tmp_path / "out", base, **run))
    settings = load_settings(RunSettings, ["--config", str(run_yaml)], environ={})
    return settings, [load_settings(WorkerSettings, ["--config", str(p)], environ={}) for p in sites]


@pytest.fixture
def fake_base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}", encoding="utf-8")
    return base


def test_sites_must_be_distinct_enough_and_admitted_by_the_run(tmp_path: Path, fake_base: Path) -> None:
    settings, sites = _configs(tmp_path, fake_base)
    stranger = sites[0].model_copy(update={"token": None, "token_file": tmp_path / "stranger"})
    (tmp_path / "stranger").write_text("not-on-the-list", encoding="utf-8")

    with pytest.raises(SimulationError, match="repeated: clinical"):
        check_sites(settings, [sites[0], sites[0], sites[2]])
    with pytest.raises(SimulationError, match="2 given, the run needs min_workers 3"):
        check_sites(settings, sites[:2])
    with pytest.raises(SimulationError, match="site clinical: not admitted"):
        check_sites(settings, [stranger, *sites[1:]])
    check_sites(settings, sites)


def test_a_run_trains_every_site_at_once_over_one_loaded_model_and_leaves_a_process_runs_files(
    tmp_path: Path, lab_model: MadeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, sites = _configs(tmp_path, lab_model.path, rounds=2)
    loads: list[SiteModel] = []
    training: list[tuple[float, float]] = []

    def load(run: RunSpec, site: SiteModel) -> LoadedModel:
        loads.append(site)
        return load_model(run, site)

    def timed(*args: Any, **kwargs: Any) -> TrainResult:
        started = time.monotonic()
        result = train_in_process(*args, **kwargs)
        training.append((started, time.monotonic()))
        return result

    monkeypatch.setattr(side_by_side, "train_in_process", timed)
    started = time.monotonic()
    outcome = Simulation(settings=settings, sites=sites, load=load, cores=1, threads=1).run()
    wall = time.monotonic() - started

    out = settings.state_dir
    assert len(loads) == 1
    assert outcome.failure is None
    assert outcome.exit_codes == {"coordinator": 0, "clinical": 0, "legal": 0, "finance": 0}
    assert all(s.outcome is not None and s.outcome.rounds_trained == 2 for s in outcome.sites.values())
    assert [r["round"] for r in outcome.report["rounds"]] == [1, 2]
    assert all(sorted(r["participants"]) == ["clinical", "finance", "legal"] for r in outcome.report["rounds"])
    assert {p.name for p in outcome.report_paths} >= {"report.json", "report.md", "report.html"}
    assert (out / "coordinator.db").exists()
    base = AutoModelForCausalLM.from_pretrained(lab_model.path)
    PeftModel.from_pretrained(base, out / "adapter")  # the committed adapter loads as peft's
    assert len(training) == 6
    assert any(a < d and c < b for i, (a, b) in enumerate(training) for c, d in training[i + 1 :])  # overlapping
    # the coordinator's clock: three sites on one core's worth of threads pass its time at a third of wall pace
    assert sum(r["duration_s"] for r in outcome.report["rounds"]) < wall


def test_sites_that_all_end_before_the_run_can_start_end_the_simulation_with_their_reasons(
    tmp_path: Path, fake_base: Path
) -> None:
    # A process federation would wait at admission until its timeout; here every site's thread is seen to end.
    settings, sites = _configs(tmp_path, fake_base)
    refused = [site.model_copy(update={"base_precision": "nf4"}) for site in sites]  # a lora run allows float32

    with pytest.raises(RuntimeError, match="every site ended before the run finished") as ended:
        Simulation(settings=settings, sites=refused).run()

    refusal = "Refused: join: PERMISSION_DENIED: base_precision 'nf4'"
    assert all(f"{worker}: {refusal}" in str(ended.value) for worker in ("clinical", "legal", "finance"))


def test_sites_of_another_rank_and_precision_each_load_their_own_kind_once(
    tmp_path: Path, lab_model: MadeModel
) -> None:
    settings, sites = _configs(
        tmp_path, lab_model.path, aggregation="hetlora", base_precisions=["nf4", "float32"], lora={"rank": 8}
    )
    shapes = [({"max_rank": 2}, "nf4"), ({"max_rank": 4}, "float32"), ({}, "float32")]
    sites = [
        site.model_copy(update={"lora": site.lora.model_copy(update=lora), "base_precision": precision})
        for site, (lora, precision) in zip(sites, shapes, strict=True)
    ]
    loads: list[SiteModel] = []

    def load(run: RunSpec, site: SiteModel) -> LoadedModel:
        loads.append(site)
        return load_model(run, site)

    outcome = Simulation(settings=settings, sites=sites, load=load).run()

    assert outcome.failure is None
    assert sorted((s.max_rank or 8, s.base_precision) for s in loads) == [(2, "nf4"), (4, "float32"), (8, "float32")]
    ranks = {w["id"]: (w["rank"], w["base_precision"]) for w in outcome.report["workers"]}
    assert ranks == {"clinical": (2, "nf4"), "legal": (4, "float32"), "finance": (8, "float32")}
