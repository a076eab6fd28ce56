"""`fedlora-lab simulate --config run.yaml --sites worker.yaml ... [--field value ...]`: one run, one process.

The configs are the ones `fedlora-server` and `fedlora-worker` load (the workers' `coordinator`,
`threads` and `metrics_port` do not apply: nothing listens); flags after them override run.yaml as
they do for `fedlora-server`. It leaves in the run's state_dir what a process federation leaves
(coordinator.db, versions, `adapter`, report.json, report.md, report.html) and its log in
`logs/simulation.log`, prints report.md, and exits 0 when the run finished, 1 when it failed, 2 on
a wrong config or site.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import structlog
import torch

from fedlora_common.logs import configure_logging
from fedlora_common.settings import ConfigError, load_settings
from fedlora_lab.simulation.engine import Simulation, SimulationError
from fedlora_server.config import RunSettings
from fedlora_server.store import StateError
from fedlora_worker.config import WorkerSettings

__all__ = ["SUMMARY", "add_simulate_arguments", "simulate"]

PROG = "fedlora-lab simulate"


SUMMARY = "run a federation (coordinator and every site) in one process, the sites training at once"


def add_simulate_arguments(simulate: argparse.ArgumentParser) -> None:
    simulate.add_argument("--config", type=Path, required=True, help="the run's run.yaml")
    simulate.add_argument("--sites", type=Path, nargs="+", required=True, help="each site's worker.yaml")
    simulate.add_argument(
        "--threads", type=int, default=None, help="torch threads each site computes with (default: cores / sites, >= 1)"
    )
    simulate.add_argument(
        "--cores",
        type=int,
        default=None,
        help="cores this run may count on, for the pace of its deadlines' clock (default: all it may run on)",
    )
    simulate.add_argument("--timeout-minutes", type=float, default=120.0, help="stop and fail the run after this")


def _load(args: argparse.Namespace, run_flags: Sequence[str]) -> tuple[RunSettings, list[WorkerSettings]]:
    """Both kinds of config as their programs load them; ConfigError names the file and field."""
    try:
        settings = load_settings(RunSettings, ["--config", str(args.config), *run_flags])
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    sites = []
    for path in args.sites:
        try:
            sites.append(load_settings(WorkerSettings, ["--config", str(path)]))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return settings, sites


def simulate(args: argparse.Namespace, run_flags: Sequence[str]) -> int:
    for flag in ("threads", "cores"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            sys.stderr.write(f"{PROG}: error: --{flag} must be >= 1, got {value}\n")
            return 2
    if args.timeout_minutes <= 0:
        sys.stderr.write(f"{PROG}: error: --timeout-minutes must be > 0, got {args.timeout_minutes}\n")
        return 2
    try:
        settings, sites = _load(args, run_flags)
        cores = args.cores or len(os.sched_getaffinity(0))
        threads = args.threads or max(1, cores // len(sites))
        simulation = Simulation(
            settings=settings,
            sites=sites,
            timeout=timedelta(minutes=args.timeout_minutes),
            cores=cores,
            threads=threads,
        )
    except (ConfigError, SimulationError) as exc:
        sys.stderr.write(f"{PROG}: config error: {exc}\n")
        return 2
    torch.set_num_threads(threads)
    log_path = settings.state_dir / "logs" / "simulation.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log_file, simulation:
        configure_logging(json=True, level="info", stream=log_file)
        structlog.contextvars.bind_contextvars(run_id=settings.run_id, component="simulation")
        try:
            outcome = simulation.run()
        except (SimulationError, StateError) as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return 2
        except (TimeoutError, RuntimeError) as exc:
            sys.stderr.write(f"{PROG}: {exc}; see {log_path}\n")
            return 1
        finally:  # the file closes here: log to the terminal again, as the rest of fedlora-lab does
            structlog.contextvars.unbind_contextvars("run_id", "component")
            configure_logging(json=False, level="warning")
    sys.stdout.write((settings.state_dir / "report.md").read_text(encoding="utf-8"))
    if outcome.failure is not None:
        sys.stderr.write(f"{PROG}: the run failed: {outcome.failure}\n")
        return 1
    unfinished = {worker: site.error or "did not finish" for worker, site in outcome.sites.items() if site.exit_code}
    if unfinished:
        sys.stderr.write(f"{PROG}: sites failed: {unfinished}\n")
        return 1
    return 0
