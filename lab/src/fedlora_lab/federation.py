"""A whole federation on one machine: a coordinator and N workers as separate OS processes on 127.0.0.1.

It is what `fedlora-lab demo` runs and what the end-to-end tests drive: the same programs,
configs and wire as a deployment, only the addresses are local.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Literal

import structlog
import yaml

from fedlora_common.secagg import identity_keypair
from fedlora_common.settings import merge
from fedlora_lab.datagen import DOMAINS, DataSpec, Domain, generate_site, write_site

__all__ = ["FederationPlan", "FederationResult", "LocalFederation", "site_names"]

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
    mode: Literal["lora", "qlora", "full"] = "lora"
    aggregation: Literal["fedavg", "ffa"] = "fedavg"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    run: dict[str, Any] = field(default_factory=dict)
    """Extra run.yaml settings (training, lora, timeouts...), merged over the defaults below."""
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


class LocalFederation:
    """Writes configs and data for every site, starts the processes, waits, collects the report."""

    def __init__(self, plan: FederationPlan, *, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._plan = plan
        self._on_ready = on_ready
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def prepare(self) -> tuple[Path, list[Path]]:
        """Write base-model link, site data, tokens and configs; return (run.yaml, worker yamls)."""
        p = self._plan
        out = p.out_dir.resolve()
        for stale in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "artifacts", "adapter", "spool"):
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
        allow: list[dict[str, str]] = []
        worker_configs = []
        identities = {worker_id: identity_keypair() for worker_id, _ in site_names(p.workers)}
        peers = {worker_id: keys.public.hex() for worker_id, keys in identities.items()}
        for index, (worker_id, domain) in enumerate(site_names(p.workers)):
            site_dir = out / "sites" / worker_id
            spec = DataSpec(**{**p.data.__dict__, "seed": p.seed * 1000 + index})
            paths = write_site(site_dir, generate_site(domain, spec))
            token = secrets.token_urlsafe(32)
            token_file = site_dir / "token"
            token_file.write_text(token, encoding="utf-8")
            token_file.chmod(0o600)
            identity_file = site_dir / "identity.key"
            identity_file.write_text(identities[worker_id].private.hex(), encoding="utf-8")
            identity_file.chmod(0o600)
            allow.append(
                {
                    "id": worker_id,
                    "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "identity_public": peers[worker_id],
                }
            )
            config = {
                "worker_id": worker_id,
                "token_file": str(token_file),
                "coordinator": "127.0.0.1:{port}",
                "base_model": str(base),
                "data": {
                    "train": [str(paths.train)],
                    "eval": [str(paths.eval)],
                    "canaries": [str(paths.canaries), str(paths.controls)],
                },
                "threads": p.threads_per_worker,
                "metrics_port": 0,
                "progress": False,
                "identity_key": str(identity_file),
                "peers": peers,
            }
            worker_configs.append((site_dir / "worker.yaml", config))
        run = {
            "run_id": f"demo-{p.mode}-{p.seed}",
            "base_model": str(base),
            "mode": p.mode,
            "aggregation": p.aggregation,
            "rounds": p.rounds,
            "min_workers": p.workers,
            "workers": allow,
            "seed": p.seed,
            "state_dir": str(out),
            "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": 0},
            "timeouts": {"poll_wait_ms": 500},
            "secure_aggregation": {"enabled": p.secure_aggregation},
        }
        run = merge(run, p.run)
        run_yaml = out / "run.yaml"
        run_yaml.write_text(yaml.safe_dump(run, sort_keys=False), encoding="utf-8")
        paths_out = []
        for path, config in worker_configs:
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            paths_out.append(path)
        return run_yaml, paths_out

    def run(self) -> FederationResult:
        run_yaml, worker_yamls = self.prepare()
        out = self._plan.out_dir.resolve()
        deadline = time.monotonic() + self._plan.timeout.total_seconds()
        try:
            server = self._start("coordinator", [sys.executable, "-m", "fedlora_server", "--config", str(run_yaml)])
            ready = _read_ready(server, deadline)
            log.info("coordinator_ready", port=ready["port"], metrics_port=ready["metrics_port"])
            for path in worker_yamls:
                config = yaml.safe_load(path.read_text(encoding="utf-8"))
                config["coordinator"] = f"127.0.0.1:{ready['port']}"
                path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
                self._start(config["worker_id"], [sys.executable, "-m", "fedlora_worker", "--config", str(path)])
            if self._on_ready is not None:
                self._on_ready({**ready, "processes": dict(self._processes)})
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
