"""The simulation engine: a whole federation in one process, the same coordinator and worker code.

The real `fedlora_server.coordinator.Coordinator` (phase machine, aggregators, secure aggregation,
DP plan, ledger in SQLite, report) and one real `fedlora_worker.daemon.Worker` per site, each in
its own thread, joined by `InProcessClient` instead of gRPC. The sites work at once, as deployed
workers do: each trains its own copy of the model over one loaded base (`SiteModels`), with the
torch threads the process was given, and trains alone only where training touches state torch
keeps once per process (`SideBySide`). What a process federation leaves in the run's state_dir,
this leaves too: coordinator.db, the committed versions, `adapter`, report.json, report.md, report.html.

The coordinator's deadlines run on a clock that slows while more sites work than the cores serve
(`ContendedClock`): a deadline passes when it would have on the sites' own machines.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
import torch
from prometheus_client import CollectorRegistry

from fedlora_common.plans import RunSpec
from fedlora_lab.simulation.clock import ContendedClock
from fedlora_lab.simulation.link import InProcessClient
from fedlora_lab.simulation.side_by_side import SideBySide
from fedlora_lab.simulation.site_models import SiteModels
from fedlora_server.auth import Authenticator, check_claim
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import CoordinatorError
from fedlora_server.metrics import ServerMetrics
from fedlora_server.report import build_report, write_reports
from fedlora_server.store import SqliteStore
from fedlora_worker.config import WorkerSettings
from fedlora_worker.daemon import Worker, WorkerOutcome
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model

__all__ = ["Simulation", "SimulationError", "SimulationOutcome", "SiteOutcome", "check_sites"]

log = structlog.get_logger()


class SimulationError(ValueError):
    """The sites and the run do not make a federation (one line naming what is wrong)."""


@dataclass(frozen=True)
class SiteOutcome:
    """How one virtual client's daemon ended: its outcome, or the error that ended it."""

    worker_id: str
    outcome: WorkerOutcome | None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """What the site's `fedlora-worker` process would have exited with."""
        return 0 if self.outcome is not None and self.outcome.finished else 1


@dataclass(frozen=True)
class SimulationOutcome:
    report: dict[str, Any]
    report_paths: tuple[Path, ...]
    sites: dict[str, SiteOutcome]
    failure: str | None
    seconds: float
    base_loads: int

    @property
    def exit_codes(self) -> dict[str, int]:
        """As a process federation reports them: the coordinator's, then each worker's."""
        return {"coordinator": 1 if self.failure else 0, **{w: s.exit_code for w, s in self.sites.items()}}


def check_sites(settings: RunSettings, sites: Sequence[WorkerSettings]) -> None:
    """Refuse, naming the problem, sites that would not make this run's federation."""
    ids = [site.worker_id for site in sites]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise SimulationError(f"sites: worker ids must be distinct; repeated: {', '.join(repeated)}")
    if len(sites) < settings.min_workers:
        raise SimulationError(f"sites: {len(sites)} given, the run needs min_workers {settings.min_workers}")
    door = Authenticator(settings.workers)
    for site in sites:  # what the coordinator's interceptor checks of every call
        try:
            token = site.bearer_token()
        except OSError as exc:
            raise SimulationError(f"site {site.worker_id}: token_file: {exc.strerror}") from None
        try:
            check_claim(door.identify(token), site.worker_id)
        except CoordinatorError as exc:
            raise SimulationError(f"site {site.worker_id}: not admitted by the run's workers list: {exc}") from None


class Simulation:
    """One run, all sites in this process. `run()` blocks; `shutdown()` may be called from any thread, twice."""

    def __init__(
        self,
        *,
        settings: RunSettings,
        sites: Sequence[WorkerSettings],
        timeout: timedelta = timedelta(hours=2),
        load: Callable[[RunSpec, SiteModel], LoadedModel] = load_model,
        loading: threading.Lock | None = None,
        registry: CollectorRegistry | None = None,
        cores: int | None = None,
        threads: int | None = None,
    ) -> None:
        """`loading`: held while a model loads and while a site trains alone (share it between simulations in
        one process). `cores` and `threads` (this machine's, and each site's torch threads: by default the
        process's) set the clock's pace."""
        check_sites(settings, sites)
        self._settings = settings
        self._sites = tuple(sites)
        self._timeout = timeout
        alone = loading or threading.Lock()
        self._models = SiteModels(load=load, loading=alone)
        self._trainer = SideBySide(alone)
        self._clock = ContendedClock(
            cores=cores or len(os.sched_getaffinity(0)), threads=threads or torch.get_num_threads()
        )
        self.registry = registry or CollectorRegistry()
        self._workers: list[Worker] = []
        self._stopping = threading.Event()

    def run(self) -> SimulationOutcome:
        """Run the federation to its end and write its report.

        TimeoutError if it outlasts `timeout`; RuntimeError if every site ended without it finishing.
        """
        started = time.monotonic()
        store = SqliteStore(self._settings.state_dir / "coordinator.db")
        try:
            coordinator = Coordinator(
                settings=self._settings,
                store=store,
                metrics=ServerMetrics(self.registry),
                clock=self._clock,
            )
            outcomes: dict[str, SiteOutcome] = {}
            workers = [(site, self._worker(coordinator, site)) for site in self._sites]
            threads = [self._start(site, worker, outcomes) for site, worker in workers]
            finished = self._wait(coordinator, threads, deadline=started + self._timeout.total_seconds())
            self._join(threads, grace_s=60.0 if finished else 5.0)
            if not finished:
                if any(thread.is_alive() for thread in threads) or len(outcomes) < len(threads):
                    raise TimeoutError(f"the simulation did not finish within {self._timeout}")
                errors = "; ".join(f"{w}: {o.error}" for w, o in outcomes.items() if o.error)
                raise RuntimeError(f"every site ended before the run finished ({errors or 'no errors'})")
            report = build_report(self._settings, store)
            paths = write_reports(report, self._settings.state_dir)
        finally:
            self.shutdown()
            store.close()
        seconds = time.monotonic() - started
        log.info("simulation_finished", seconds=round(seconds, 1), failure=coordinator.failure)
        return SimulationOutcome(
            report=report,
            report_paths=tuple(paths),
            sites={site.worker_id: outcomes[site.worker_id] for site in self._sites},
            failure=coordinator.failure,
            seconds=seconds,
            base_loads=self._models.loads,
        )

    def _worker(self, coordinator: Coordinator, site: WorkerSettings) -> Worker:
        """The site's real daemon, talking in process, training its own copy of the model."""
        client = InProcessClient(
            coordinator=coordinator,
            worker_id=site.worker_id,
            clock=self._clock,
            chunk_bytes=self._settings.limits.chunk_bytes,
        )
        try:
            worker = Worker(
                settings=site,
                client=client,
                metrics=WorkerMetrics(CollectorRegistry()),
                load=self._models.load,
                train=self._trainer,
            )
        except (OSError, ValueError) as exc:  # what fedlora-worker refuses at start with exit 2
            raise SimulationError(f"site {site.worker_id}: data: {exc}") from None
        self._workers.append(worker)
        return worker

    def _start(self, site: WorkerSettings, worker: Worker, outcomes: dict[str, SiteOutcome]) -> threading.Thread:
        def work() -> None:
            try:
                with worker:
                    outcomes[site.worker_id] = SiteOutcome(site.worker_id, worker.run())
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.error("site_failed", worker_id=site.worker_id, error=error)
                outcomes[site.worker_id] = SiteOutcome(site.worker_id, None, error)
            finally:
                self._clock.working(site.worker_id, False)

        thread = threading.Thread(target=work, name=f"site-{site.worker_id}", daemon=True)
        thread.start()
        return thread

    def _wait(self, coordinator: Coordinator, threads: Sequence[threading.Thread], *, deadline: float) -> bool:
        """True once the run finished; False when the deadline passed or every site ended without it."""
        while time.monotonic() < deadline:
            if coordinator.finished.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                return True
            if not any(thread.is_alive() for thread in threads):
                coordinator.tick()
                return coordinator.finished.is_set()
        return coordinator.finished.is_set()

    def _join(self, threads: Sequence[threading.Thread], *, grace_s: float) -> None:
        """Let every site see FINISHED; stop the ones that do not within grace_s."""
        deadline = time.monotonic() + grace_s
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            self.shutdown()
            for thread in threads:
                thread.join(timeout=10.0)

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for worker in self._workers:
            worker.shutdown()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
