"""examples/two-sites, as a newcomer runs it: setup.sh, then the coordinator and two sites as processes
(tiny lab model, two rounds, secure aggregation over mutual TLS), watched by a real Prometheus that the
test reads back through its HTTP API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedlora_common.settings import load_settings
from fedlora_lab.model_factory import MadeModel
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from tests.deploy.example import SITES, prepare_example
from tests.deploy.processes import Processes, listening
from tests.deploy.prometheus import Prometheus
from tests.deploy.support import coordinator_command, free_port, worker_command


@dataclass(frozen=True)
class ExampleRun:
    out: Path
    setup_output: str
    exit_codes: dict[str, int]
    report: dict[str, Any]
    rounds_completed: list[dict[str, Any]]
    training_steps: list[dict[str, Any]]
    run_finished: list[dict[str, Any]]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, lab_model: MadeModel) -> ExampleRun:
    out = tmp_path_factory.mktemp("two-sites")
    setup_output = prepare_example(out, lab_model)
    metrics = {name: free_port() for name in ("coordinator", *SITES)}
    jobs = {
        "fedlora-coordinator": [(metrics["coordinator"], {})],
        "fedlora-worker": [(metrics[site], {}) for site in SITES],  # each site labels its series itself
    }
    with Prometheus(out / "prometheus", jobs) as prometheus, Processes(out / "logs") as processes:
        coordinator = processes.start(
            "coordinator",
            [
                *coordinator_command("run.yaml"),
                *("--listen.host", "127.0.0.1", "--listen.port", "0"),
                *("--listen.metrics_port", str(metrics["coordinator"])),
                *("--listen.metrics_linger_s", "3"),  # three of this Prometheus' 1 s scrapes see the end
            ],
            cwd=out,
            stdout_pipe=True,
        )
        port = listening(coordinator)["port"]
        for site, (config, _) in SITES.items():
            processes.start(
                site,
                [
                    *worker_command(config),
                    *("--coordinator", f"localhost:{port}", "--metrics_port", str(metrics[site])),
                    *("--metrics_linger_s", "5"),  # this Prometheus scrapes every 1 s, up to 1 s each under load
                ],
                cwd=out,
            )
        codes = processes.wait_all(timeout=480)
        rounds = prometheus.query("max_over_time(fedlora_rounds_completed_total[15m])")
        finished = prometheus.query("max_over_time(fedlora_run_finished[15m])")
        steps = prometheus.query("max by (worker) (max_over_time(fedlora_worker_training_steps_total[15m]))")
    report = json.loads((out / "coordinator-state" / "report.json").read_text(encoding="utf-8"))
    return ExampleRun(out, setup_output, codes, report, rounds, steps, finished)


def test_setup_writes_configs_the_programs_accept(example: ExampleRun) -> None:
    run = load_settings(RunSettings, ["--config", str(example.out / "run.yaml")], environ={})
    workers = [
        load_settings(WorkerSettings, ["--config", str(example.out / config)], environ={})
        for config, _ in SITES.values()
    ]

    assert "setup: done" in example.setup_output
    assert run.secure_aggregation.enabled
    assert [w.id for w in run.workers] == list(SITES)
    assert all(w.peers == {e.id: e.identity_public for e in run.workers} for w in workers)


def test_the_example_runs_its_rounds_with_secure_aggregation_over_mutual_tls(example: ExampleRun) -> None:
    run = load_settings(RunSettings, ["--config", str(example.out / "run.yaml")], environ={})

    assert example.exit_codes == {"coordinator": 0, "site-a": 0, "site-b": 0}
    assert example.report["secure_aggregation"] is True
    assert [r["round"] for r in example.report["rounds"]] == list(range(1, run.rounds + 1))
    assert all(sorted(r["participants"]) == list(SITES) for r in example.report["rounds"])
    assert run.listen.tls is not None
    assert run.listen.tls.client_ca is not None


def test_prometheus_scraped_the_rounds_the_coordinator_completed(example: ExampleRun) -> None:
    assert [float(sample["value"][1]) for sample in example.rounds_completed] == [len(example.report["rounds"])]


def test_prometheus_scraped_the_finished_run_before_the_coordinator_exited(example: ExampleRun) -> None:
    assert [float(sample["value"][1]) for sample in example.run_finished] == [1.0]


def test_prometheus_scraped_every_sites_training_steps(example: ExampleRun) -> None:
    run = load_settings(RunSettings, ["--config", str(example.out / "run.yaml")], environ={})

    steps = {sample["metric"]["worker"]: float(sample["value"][1]) for sample in example.training_steps}

    assert steps == {site: float(run.rounds * run.training.local_steps) for site in SITES}
