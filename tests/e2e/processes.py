"""A local federation of real processes that a test can kill and restart at moments read from their logs.

`fedlora-server` and one `fedlora-worker` per site run as OS processes on 127.0.0.1, with the
configs, data and keys `fedlora_lab.federation.LocalFederation` writes. Each worker reaches the
coordinator through a loopback proxy of its own (tests/netfault.py) whose port never changes, so a
coordinator restarted on a new port 0 is found again by workers that only know the first address,
and a killed worker's link drops what it still carried (a host that dies takes its unsent bytes along).
Every incarnation of a process logs to a file of its own; `wait_for` reads their JSON events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import BaseModel

from fedlora_lab.datagen import DataSpec
from fedlora_lab.federation import FederationPlan, LocalFederation
from fedlora_worker.config import RetrySettings, WorkerSettings
from tests.netfault import FaultyProxy

__all__ = ["COORDINATOR", "Event", "Federation", "federation", "is_event", "tiny_plan"]

Event = dict[str, Any]
COORDINATOR = "coordinator"
COMMIT_WINDOWS = Path(__file__).with_name("commit_windows.py")


def tiny_plan(out: Path, base_model: Path, *, rounds: int = 2, **run: Any) -> FederationPlan:
    """Three sites on the tiny lab model, a few steps a round, secure aggregation, every round audited."""
    settings: dict[str, Any] = {
        "training": {"local_steps": 2, "batch_size": 4, "max_seq_len": 64},
        "lora": {"rank": 4, "alpha": 8},
        "audit": {"every": 1, "prefixes": [8], "suffix_tokens": 8, "exposure_candidates": 8},
        "timeouts": {"poll_wait_ms": 100, "admission_s": 60},
    }
    for key, value in run.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return FederationPlan(
        out_dir=out,
        base_model=base_model,
        workers=3,
        rounds=rounds,
        seed=7,
        data=DataSpec(n_train=12, n_eval=3, n_canaries=2, n_controls=1),
        run=settings,
        run_id="crash",
        secure_aggregation=True,
    )


def _write_settings(path: Path, settings: BaseModel) -> None:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_defaults=True), sort_keys=False))


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


@dataclass
class Federation:
    """The processes of one federation; `close()` (or the context manager) ends whatever still runs."""

    plan: FederationPlan
    run_yaml: Path = field(init=False)
    workers: dict[str, Path] = field(init=False, default_factory=dict)
    links: dict[str, FaultyProxy] = field(init=False, default_factory=dict)
    running: dict[str, _Process] = field(init=False, default_factory=dict)
    logs: dict[str, list[Path]] = field(init=False, default_factory=dict)
    exits: dict[str, list[int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.run_yaml, sites = LocalFederation(self.plan).prepare()
        for path, settings in sites.items():
            link = self.links[settings.worker_id] = FaultyProxy(("127.0.0.1", 1), lifetime_s=1800).start()
            retry = RetrySettings(initial_backoff_s=0.2, max_backoff_s=1)
            _write_settings(path, settings.model_copy(update={"coordinator": link.target, "retry": retry}))
            WorkerSettings.model_validate(yaml.safe_load(path.read_text()))  # as the worker will load it
            self.workers[settings.worker_id] = path

    @property
    def out(self) -> Path:
        return self.plan.out_dir.resolve()

    # ---- processes --------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], *, stdout_pipe: bool = False) -> _Process:
        incarnation = len(self.logs.setdefault(name, [])) + 1
        log = self.out / "logs" / f"{name}-{incarnation}.log"
        handle = log.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE if stdout_pipe else handle, stderr=handle, env=env, cwd=self.out
        )
        process = _Process(popen, log, handle)
        self.running[name] = process
        self.logs[name].append(log)
        return process

    def start_coordinator(self, *, dies_in: tuple[str, int] | None = None) -> None:
        """Start the coordinator; with `dies_in` (window, version) it SIGKILLs itself there (commit_windows.py)."""
        program = ["-m", "fedlora_server"] if dies_in is None else [str(COMMIT_WINDOWS), dies_in[0], str(dies_in[1])]
        process = self._start(COORDINATOR, [sys.executable, *program, "--config", str(self.run_yaml)], stdout_pipe=True)
        assert process.popen.stdout is not None
        line = process.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the coordinator exited before listening: {process.log.read_text()[-2000:]}")
        for link in self.links.values():
            link.retarget(("127.0.0.1", int(json.loads(line)["port"])))

    def delay(self, seconds: float) -> None:
        """Hold every 16 kB block on every worker's link this long (0: no delay)."""
        for link in self.links.values():
            link.delay(seconds)

    def start_worker(self, worker: str) -> None:
        self._start(worker, [sys.executable, "-m", "fedlora_worker", "--config", str(self.workers[worker])])

    def start_all(self) -> None:
        self.start_coordinator()
        for worker in self.workers:
            self.start_worker(worker)

    def kill(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is flushed or said to anyone."""
        process = self.running.pop(name)
        process.popen.send_signal(signal.SIGKILL)
        if name in self.links:
            self.links[name].drop()
        self.exits.setdefault(name, []).append(process.popen.wait(timeout=30))
        self._release(process)

    def reap(self, name: str, timeout_s: float) -> int:
        """Wait for one process to end by itself (a coordinator that kills itself); its exit code."""
        process = self.running[name]
        try:
            code = process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still runs after {timeout_s:.0f} s: {self.tail(name)}") from None
        self.exits.setdefault(name, []).append(code)
        self._release(self.running.pop(name))
        return code

    def wait_exit(self, timeout_s: float) -> dict[str, int]:
        """Wait for every running process to exit by itself; their exit codes."""
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for name, process in list(self.running.items()):
            try:
                codes[name] = process.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{name} still runs after {timeout_s:.0f} s: {self.tail(name)}") from None
            self.exits.setdefault(name, []).append(codes[name])
            self._release(self.running.pop(name))
        return codes

    def _release(self, process: _Process) -> None:
        if process.popen.stdout is not None:
            process.popen.stdout.close()
        process.handle.close()

    def close(self) -> None:
        for name in list(self.running):
            self.kill(name)
        for link in self.links.values():
            link.stop()

    # ---- logs -------------------------------------------------------------------------

    def events(self, name: str) -> list[Event]:
        """Every JSON event `name` logged, across its incarnations."""
        out: list[Event] = []
        for log in self.logs.get(name, []):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by SIGKILL
                        continue
        return out

    def mark(self) -> dict[str, int]:
        """How many events each process has logged so far: `wait_for(after=...)` looks past them."""
        return {name: len(self.events(name)) for name in self.logs}

    def wait_for(
        self,
        name: str,
        matches: Callable[[Event], bool],
        *,
        timeout_s: float = 120,
        after: dict[str, int] | None = None,
    ) -> Event:
        """The first event of `name` (after the mark) that matches; TimeoutError naming what was seen last."""
        deadline = time.monotonic() + timeout_s
        skip = (after or {}).get(name, 0)
        while time.monotonic() < deadline:
            for event in self.events(name)[skip:]:
                if matches(event):
                    return event
            if name in self.running and self.running[name].popen.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.running[name].popen.returncode}): {self.tail(name)}")
            time.sleep(0.02)
        raise TimeoutError(f"no such event from {name} within {timeout_s:.0f} s: {self.tail(name)}")

    def tail(self, name: str, lines: int = 12) -> str:
        events = self.events(name)[-lines:]
        return "; ".join(f"{e.get('event')} {_brief(e)}" for e in events)


def _brief(event: Event) -> str:
    keep = ("round", "attempt", "stage", "worker_id", "reason", "kind", "workers")
    return " ".join(f"{k}={event[k]}" for k in keep if k in event)


def is_event(name: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda event: event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


@contextmanager
def federation(plan: FederationPlan) -> Iterator[Federation]:
    running = Federation(plan)
    try:
        yield running
    finally:
        running.close()
