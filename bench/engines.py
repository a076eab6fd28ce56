"""How much faster the simulation engine runs a federation than the process engine: the same run on both.

The run is the lab demo's (`fedlora-lab demo` defaults: the default lab model, 3 sites, LoRA r 16,
30 local steps of batch 8, secure aggregation, the canary audit every round) for a few rounds,
once on each engine, in this one process session:

* processes: a coordinator and one worker per site, each an OS process, over gRPC on 127.0.0.1, one
  torch thread per worker (`LocalFederation`, as `fedlora-lab demo` and the experiment ran them);
* simulation: the same coordinator and worker code in this process, every site training at once on
  its own copy of one loaded base model, each with cores / sites torch threads (at least one)
  (`SimulatedFederation`).

The engines alternate (processes, simulation, processes, ...) so that drift in the machine's load
hits both alike; the table gives medians of wall time and of CPU time (user + system: the children's
for the processes, this process's for the simulation). It also checks that the simulation committed
the same adapter as the processes (bit for bit is expected at one thread a site: secure aggregation
sums integers).

Usage: python bench/engines.py [--rounds N] [--repeats N] [--sites N] [--quick] [--model-size default|small|tiny]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers.utils import logging as hf_logging

from fedlora_common.logs import configure_logging
from fedlora_lab.datagen import DataSpec
from fedlora_lab.federation import FederationPlan, FederationResult, LocalFederation
from fedlora_lab.model_factory import LAB_SIZES, LabModelConfig, LabSize, cached_model
from fedlora_lab.simulation import SimulatedFederation

WALL_TARGETS = {3: 0.5, 10: 0.25}
"""Issue 19: simulation wall / processes wall at the demo's 3 sites and at 10."""


def demo_plan(
    out: Path, base: Path, *, rounds: int, local_steps: int, data: DataSpec, sites: int = 3
) -> FederationPlan:
    """`fedlora-lab demo`'s run (3 sites), LoRA lr 3e-3, batch 8, secure aggregation, audit every round."""
    return FederationPlan(
        out_dir=out,
        base_model=base,
        workers=sites,
        rounds=rounds,
        mode="lora",
        secure_aggregation=True,
        seed=0,
        data=data,
        run={
            "training": {"local_steps": local_steps, "learning_rate": 3e-3, "batch_size": 8},
            "audit": {"every": 1},
        },
        run_id="bench-engines",
        threads_per_worker=1,
        timeout=timedelta(hours=2),
    )


def _adapter(result: FederationResult) -> dict[str, np.ndarray]:
    return load_file(str(result.out_dir / result.report["adapter_path"] / "adapter_model.safetensors"))


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each engine, alternating")
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round of 4 steps, small sites")
    parser.add_argument("--model-size", choices=LAB_SIZES, default="default")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedlora")
    parser.add_argument("--sites", type=int, default=3, help="sites of the federation (the demo's: 3)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    configure_logging(json=False, level="error")
    size: LabSize = "tiny" if args.quick else args.model_size
    rounds, steps = (1, 4) if args.quick else (args.rounds, args.local_steps)
    data = DataSpec(n_train=24, n_canaries=4, n_controls=2) if args.quick else DataSpec()
    made = cached_model(args.cache_dir, LabModelConfig.named(size))
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // args.sites)
    threads_before = torch.get_num_threads()

    def plan(out: Path) -> FederationPlan:
        return demo_plan(out, made.path, rounds=rounds, local_steps=steps, data=data, sites=args.sites)

    def simulated(out: Path) -> FederationResult:
        torch.set_num_threads(threads)
        try:
            return SimulatedFederation(plan(out)).run()
        finally:
            torch.set_num_threads(threads_before)

    def processes(out: Path) -> FederationResult:
        return LocalFederation(plan(out)).run()

    processes_name = f"processes (1 + {args.sites} processes)"
    simulation_name = "simulation (1 process)"
    engines: dict[str, tuple[str, Callable[[Path], FederationResult], int]] = {
        processes_name: ("1 a worker", processes, resource.RUSAGE_CHILDREN),
        simulation_name: (f"{threads} a site", simulated, resource.RUSAGE_SELF),
    }
    walls: dict[str, list[float]] = {name: [] for name in engines}
    cpus: dict[str, list[float]] = {name: [] for name in engines}
    adapters: dict[str, dict[str, np.ndarray]] = {}
    print(
        f"the demo's run: {size} lab model, {args.sites} sites, {rounds} round(s) x {steps} "
        f"local steps, secure aggregation, audit every round; {cores} cores, "
        f"{args.repeats} run(s) of each engine, alternating",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as scratch:
        for repeat in range(args.repeats):
            for name, (_, run, who) in engines.items():
                out = Path(scratch) / f"{repeat}-{name.split()[0]}"
                cpu_before, started = _cpu_seconds(who), time.monotonic()
                result = run(out)
                walls[name].append(time.monotonic() - started)
                cpus[name].append(_cpu_seconds(who) - cpu_before)
                failed = {who: code for who, code in result.exit_codes.items() if code != 0}
                if failed:
                    raise SystemExit(f"{name}: failed {failed}; see {out / 'logs'}")
                adapters.setdefault(name, _adapter(result))
                print(f"  {name}: {walls[name][-1]:.1f} s, {cpus[name][-1]:.1f} CPU s", flush=True)
                shutil.rmtree(out, ignore_errors=True)

    reference = statistics.median(walls[processes_name])
    print()
    print(f"{'engine':<30} {'torch threads':>14} {'wall s':>9} {'CPU s':>9} {'wall / processes':>17}")
    print("-" * 83)
    for name, (threads_of, _, _) in engines.items():
        wall = statistics.median(walls[name])
        cpu = statistics.median(cpus[name])
        print(f"{name:<30} {threads_of:>14} {wall:>9.1f} {cpu:>9.1f} {wall / reference:>16.2f}x")
    print()
    diff = _max_diff(adapters[simulation_name], adapters[processes_name])
    verdict = "bit-identical" if diff == 0 else f"max |difference| {diff:.3g}"
    print(f"committed adapter, simulation vs processes: {verdict}")
    ratio = statistics.median(walls[simulation_name]) / reference
    target = WALL_TARGETS.get(args.sites)
    verdict = "" if target is None else f" (target <= {target}x: {'met' if ratio <= target else 'MISSED'})"
    print(f"simulation / processes wall {ratio:.2f}x{verdict}")
    cpu_ratio = statistics.median(cpus[simulation_name]) / statistics.median(cpus[processes_name])
    print(f"simulation / processes CPU time {cpu_ratio:.2f}x: on {cores} cores the wall ratio cannot go below it")


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
