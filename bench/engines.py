"""How much faster the simulation engine runs a federation than the process engine: the same run on both.

The run is the lab demo's (`fedlora-lab demo` defaults: the default lab model, 3 sites, LoRA r 16,
30 local steps of batch 8, secure aggregation, the canary audit every round) for a few rounds,
once on each engine, in this one process session:

* processes: a coordinator and 3 workers, each an OS process, over gRPC on 127.0.0.1, one torch
  thread per worker (`LocalFederation`, as `fedlora-lab demo` and the experiment ran them);
* simulation: the same coordinator and worker code in this process, the sites taking turns on one
  loaded base model with every core's torch threads (`SimulatedFederation`);
* simulation, 1 thread: the same with one torch thread, which separates what the engine saves
  (processes, model loads, gRPC, poll waits, three workers thrashing two cores) from what threads add.

The engines alternate (processes, simulation, simulation 1 thread, processes, ...) so that drift in
the machine's load hits all of them alike; the table gives medians. It also checks that each
simulation committed the same adapter as the processes (bit for bit is expected at equal threads:
secure aggregation sums integers).

Usage: python bench/engines.py [--rounds N] [--repeats N] [--sites N] [--quick] [--model-size default|small|tiny]
"""

from __future__ import annotations

import argparse
import os
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

SPEEDUP_TARGET = 1.0  # the simulation must not be slower; the figure is what it is


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
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the simulation's torch threads")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    configure_logging(json=False, level="error")
    size: LabSize = "tiny" if args.quick else args.model_size
    rounds, steps = (1, 4) if args.quick else (args.rounds, args.local_steps)
    data = DataSpec(n_train=24, n_canaries=4, n_controls=2) if args.quick else DataSpec()
    made = cached_model(args.cache_dir, LabModelConfig.named(size))
    threads_before = torch.get_num_threads()
    processes_name = f"processes (1 + {args.sites} processes)"

    def plan(out: Path) -> FederationPlan:
        return demo_plan(out, made.path, rounds=rounds, local_steps=steps, data=data, sites=args.sites)

    def simulated(threads: int) -> Callable[[Path], FederationResult]:
        def run(out: Path) -> FederationResult:
            torch.set_num_threads(threads)
            try:
                return SimulatedFederation(plan(out)).run()
            finally:
                torch.set_num_threads(threads_before)

        return run

    def processes(out: Path) -> FederationResult:
        return LocalFederation(plan(out)).run()

    engines: dict[str, tuple[str, Callable[[Path], FederationResult]]] = {
        processes_name: ("1 per worker", processes),
        "simulation (1 process)": (str(args.threads), simulated(args.threads)),
        "simulation, 1 thread": ("1", simulated(1)),
    }
    walls: dict[str, list[float]] = {name: [] for name in engines}
    rounds_s: dict[str, list[float]] = {name: [] for name in engines}
    adapters: dict[str, dict[str, np.ndarray]] = {}
    print(
        f"the demo's run: {size} lab model, {args.sites} sites, {rounds} round(s) x {steps} "
        f"local steps, secure aggregation, audit every round; {os.cpu_count()} cores, "
        f"{args.repeats} run(s) of each engine, alternating",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as scratch:
        for repeat in range(args.repeats):
            for name, (_, run) in engines.items():
                out = Path(scratch) / f"{repeat}-{name.split()[0]}-{len(walls[name])}"
                started = time.monotonic()
                result = run(out)
                walls[name].append(time.monotonic() - started)
                failed = {who: code for who, code in result.exit_codes.items() if code != 0}
                if failed:
                    raise SystemExit(f"{name}: failed {failed}; see {out / 'logs'}")
                rounds_s[name].append(sum(r["duration_s"] for r in result.report["rounds"]))
                adapters.setdefault(name, _adapter(result))
                print(f"  {name}: {walls[name][-1]:.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)

    reference = statistics.median(walls[processes_name])
    print()
    print(f"{'engine':<30} {'torch threads':>14} {'wall s':>9} {'rounds s':>9} {'speed-up':>9}")
    print("-" * 75)
    for name, (threads, _) in engines.items():
        wall = statistics.median(walls[name])
        print(
            f"{name:<30} {threads:>14} {wall:>9.1f} {statistics.median(rounds_s[name]):>9.1f} {reference / wall:>8.2f}x"
        )
    print()
    processes_adapter = adapters[processes_name]
    for name in ("simulation (1 process)", "simulation, 1 thread"):
        diff = _max_diff(adapters[name], processes_adapter)
        verdict = "bit-identical" if diff == 0 else f"max |difference| {diff:.3g}"
        print(f"committed adapter, {name} vs processes: {verdict}")
    speedup = reference / statistics.median(walls["simulation (1 process)"])
    print(f"simulation / processes speed-up {speedup:.2f}x (target > {SPEEDUP_TARGET:.1f}x)")


if __name__ == "__main__":
    main()
