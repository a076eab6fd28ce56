"""A lab federation (`FederationPlan`) on the simulation engine: the same files as a process run, one process.

`LocalFederation.prepare` writes the base model, each site's data, tokens, identity keys and
run.yaml; the worker.yaml files are written too (they name no reachable coordinator: nothing
listens), so `fedlora-lab simulate --config OUT/run.yaml --sites OUT/sites/*/worker.yaml` replays
the run. `run` simulates in this process; `run_in_child` in one `fedlora-lab simulate` process,
which owns its torch threads, random state and log (how the experiment runs several side by side).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from fedlora_common.settings import load_settings
from fedlora_lab.federation import FederationPlan, FederationResult, LocalFederation, write_settings
from fedlora_lab.simulation.engine import Simulation
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings

__all__ = ["SimulatedFederation"]


class SimulatedFederation:
    """Writes configs and data for every site, simulates the run, returns its report."""

    def __init__(self, plan: FederationPlan, *, loading: threading.Lock | None = None) -> None:
        self._plan = plan
        self._loading = loading

    def prepare(self) -> tuple[Path, list[Path]]:
        """run.yaml and each site's worker.yaml, written with the sites' data."""
        run_yaml, workers = LocalFederation(self._plan).prepare()
        for path, settings in workers.items():
            write_settings(path, settings)
        return run_yaml, list(workers)

    def run(self) -> FederationResult:
        """Simulate in this process (torch threads as this process has them)."""
        run_yaml, worker_yamls = self.prepare()
        settings = load_settings(RunSettings, ["--config", str(run_yaml)])
        sites = [load_settings(WorkerSettings, ["--config", str(path)]) for path in worker_yamls]
        outcome = Simulation(settings=settings, sites=sites, timeout=self._plan.timeout, loading=self._loading).run()
        return FederationResult(self._plan.out_dir.resolve(), outcome.report, outcome.exit_codes)

    def run_in_child(self, *, cores: int) -> FederationResult:
        """Simulate in one `fedlora-lab simulate` process on `cores` cores, split among the sites (at least one
        torch thread each); its output in logs/."""
        run_yaml, worker_yamls = self.prepare()
        out = self._plan.out_dir.resolve()
        minutes = self._plan.timeout.total_seconds() / 60
        argv = [sys.executable, "-m", "fedlora_lab", "simulate", "--config", str(run_yaml), "--sites"]
        argv += [str(path) for path in worker_yamls]
        argv += ["--cores", str(cores), "--timeout-minutes", f"{minutes:g}"]
        with (out / "logs" / "simulate.out").open("wb") as output:
            try:
                code = subprocess.run(
                    argv, stdout=output, stderr=output, timeout=60 * minutes + 120, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the simulation did not finish within {self._plan.timeout}") from None
        report_path = out / "report.json"
        if not report_path.exists():
            raise RuntimeError(f"the simulation ended without a report (exit code {code}); see {out / 'logs'}")
        return FederationResult(out, json.loads(report_path.read_text(encoding="utf-8")), {"simulation": code})
