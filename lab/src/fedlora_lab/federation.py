"""A whole federation on one machine: a coordinator and N workers as separate OS processes on 127.0.0.1.

It is what `fedlora-lab demo` runs and what the end-to-end tests drive: the same programs,
configs and wire as a deployment, only the addresses are local.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import structlog
import yaml
from pydantic import BaseModel

from fedlora_common.plans import Aggregation, Mode
from fedlora_common.secagg import identity_keypair
from fedlora_common.settings import merge
from fedlora_lab.datagen import DOMAINS, DataSpec, Domain, generate_site, write_site
from fedlora_server.config import RunSettings, WorkerEntry, token_digest
from fedlora_worker.config import DataSection, WorkerSettings

__all__ = ["FederationPlan", "FederationResult", "LocalFederation", "run_settings", "site_names", "write_settings"]

log = structlog.get_logger()


def site_names(count: int) -> list[tuple[str, Domain]]:
    """Worker ids and their domains: clinical, legal, finance, clinical-2, ..."""
    out: list[tuple[str, Domain]] = []
    for i in range(count):
        domain = DOMAINS[i % len(DOMAINS)]
        out.append((domain if i < len(DOMAINS) else f"{domain}-{i // len(DOMAINS) + 1}", domain))
    return out


@dataclass(frozen=True)
class FederationPlan:
    out_dir: Path
    base_model: Path
    workers: int = 3
    rounds: int = 3
    mode: Mode = "lora"
    aggregation: Aggregation = "fedavg"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    run: Mapping[str, Any] = field(default_factory=dict)
    """Further run.yaml settings (training, lora, privacy, audit...), over the federation's own."""
    run_id: str | None = None
    """Defaults to ``demo-<mode>-<seed>``."""
    secure_aggregation: bool = True
    threads_per_worker: int = 1
    timeout: timedelta = timedelta(minutes=30)


@dataclass(frozen=True)
class FederationResult:
    out_dir: Path
    report: dict[str, Any]
    exit_codes: dict[str, int]

    @property
    def report_markdown(self) -> str:
        return (self.out_dir / "report.md").read_text(encoding="utf-8")


def run_settings(
    plan: FederationPlan, *, base_model: str, state_dir: Path, workers: Sequence[WorkerEntry]
) -> RunSettings:
    """The coordinator's settings for a federation on 127.0.0.1; ValidationError names a bad field."""
    run = {
        "run_id": plan.run_id or f"demo-{plan.mode}-{plan.seed}",
        "base_model": base_model,
        "mode": plan.mode,
        "aggregation": plan.aggregation,
        "rounds": plan.rounds,
        "min_workers": plan.workers,
        "workers": list(workers),
        "seed": plan.seed,
        "state_dir": str(state_dir),
        "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": 0},
        "timeouts": {"poll_wait_ms": 500},
        "secure_aggregation": {"enabled": plan.secure_aggregation},
    }
    return RunSettings.model_validate(merge(run, plan.run))


def write_settings(path: Path, settings: BaseModel) -> None:
    """A settings model as the YAML its program loads: only what differs from the defaults."""
    dumped = settings.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(dumped, sort_keys=False), encoding="utf-8")


class LocalFederation:
    """Writes configs and data for every site, starts the processes, waits, collects the report."""

    def __init__(self, plan: FederationPlan) -> None:
        self._plan = plan
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def prepare(self) -> tuple[Path, dict[Path, WorkerSettings]]:
        """Write base model, site data, tokens and run.yaml; return run.yaml and each site's settings.

        The worker configs are written once the coordinator has a port (``run``).
        """
        p = self._plan
        out = p.out_dir.resolve()
        for stale in (
            "coordinator.db",
            "coordinator.db-wal",
            "coordinator.db-shm",
            "artifacts",
            "adapter",
            "spool",
            "report.json",
        ):
            target = out / stale
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        base = out / "base-model"
        if base.resolve() != p.base_model.resolve():
            shutil.rmtree(base, ignore_errors=True)
            shutil.copytree(p.base_model, base)
        allow: list[WorkerEntry] = []
        workers: dict[Path, WorkerSettings] = {}
        identities = {worker_id: identity_keypair() for worker_id, _ in site_names(p.workers)}
        peers = {worker_id: keys.public.hex() for worker_id, keys in identities.items()}
        for index, (worker_id, domain) in enumerate(site_names(p.workers)):
            site_dir = out / "sites" / worker_id
            spec = dataclasses.replace(p.data, seed=p.seed * 1000 + index)
            paths = write_site(site_dir, generate_site(domain, spec))
            token = secrets.token_urlsafe(32)
            token_file = site_dir / "token"
            token_file.write_text(token, encoding="utf-8")
            token_file.chmod(0o600)
            identity_file = site_dir / "identity.key"
            identity_file.write_text(identities[worker_id].private.hex(), encoding="utf-8")
            identity_file.chmod(0o600)
            allow.append(WorkerEntry(id=worker_id, token_sha256=token_digest(token), identity_public=peers[worker_id]))
            workers[site_dir / "worker.yaml"] = WorkerSettings.model_validate(
                {
                    "worker_id": worker_id,
                    "token_file": token_file,
                    "base_model": str(base),
                    "data": DataSection(
                        train=(paths.train,), eval=(paths.eval,), canaries=(paths.canaries, paths.controls)
                    ),
                    "threads": p.threads_per_worker,
                    "metrics_port": 0,
                    "progress": False,
                    "identity_key": identity_file,
                    "peers": peers,
                }
            )
        run_yaml = out / "run.yaml"
        write_settings(run_yaml, run_settings(p, base_model=str(base), state_dir=out, workers=allow))
        return run_yaml, workers

    def run(self) -> FederationResult:
        run_yaml, workers = self.prepare()
        out = self._plan.out_dir.resolve()
        deadline = time.monotonic() + self._plan.timeout.total_seconds()
        try:
            server = self._start("coordinator", [sys.executable, "-m", "fedlora_server", "--config", str(run_yaml)])
            ready = _read_ready(server, deadline)
            log.info("coordinator_ready", port=ready["port"], metrics_port=ready["metrics_port"])
            for path, settings in workers.items():
                write_settings(path, settings.model_copy(update={"coordinator": f"127.0.0.1:{ready['port']}"}))
                self._start(settings.worker_id, [sys.executable, "-m", "fedlora_worker", "--config", str(path)])
            codes = self._wait_all(deadline)
        finally:
            self.stop()
        report_path = out / "report.json"
        if not report_path.exists():
            raise RuntimeError(f"the federation ended without a report (exit codes {codes}); see {out / 'logs'}")
        return FederationResult(out, json.loads(report_path.read_text(encoding="utf-8")), codes)

    def _start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log_file = (self._plan.out_dir / "logs" / f"{name}.log").open("wb")
        self._logs.append(log_file)
        env = {**os.environ, "OMP_NUM_THREADS": str(self._plan.threads_per_worker), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE if name == "coordinator" else log_file, stderr=log_file, env=env
        )
        self._processes[name] = process
        return process

    def _wait_all(self, deadline: float) -> dict[str, int]:
        codes: dict[str, int] = {}
        for name, process in self._processes.items():
            remaining = max(1.0, deadline - time.monotonic())
            try:
                codes[name] = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{name} did not finish within {self._plan.timeout}") from None
        return codes

    def stop(self) -> None:
        """Terminate whatever still runs; safe to call twice."""
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for handle in self._logs:
            handle.close()
        self._logs.clear()


def _read_ready(server: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line:
        code = server.wait(timeout=max(1.0, deadline - time.monotonic()))
        raise RuntimeError(f"the coordinator exited with code {code} before listening")
    ready: dict[str, Any] = json.loads(line)
    return ready
