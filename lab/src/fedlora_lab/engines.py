"""Two engines, one code: which one runs a lab federation (`FederationPlan`).

``processes`` (the deployment engine): a coordinator and one worker per site, each an OS process,
over gRPC on 127.0.0.1 (`LocalFederation`). ``simulation``: the same coordinator and worker code in
one `fedlora-lab simulate` process, the sites training at once, each on its own copy of one loaded
base model with its share of the threads it is given (`SimulatedFederation`). Both leave the same files and report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, Literal

from fedlora_lab.federation import FederationPlan, FederationResult, LocalFederation
from fedlora_lab.simulation.federation import SimulatedFederation
from fedlora_lab.watch import watching

__all__ = ["ENGINES", "Engine", "run_federation"]

Engine = Literal["simulation", "processes"]
ENGINES: Final[tuple[Engine, ...]] = ("simulation", "processes")


def run_federation(
    plan: FederationPlan,
    *,
    engine: Engine,
    cores: int | None = None,
    say: Callable[[str], None] | None = None,
) -> FederationResult:
    """Run `plan` on `engine`; `cores`: what the simulation splits among its sites (default: all); `say` gets a
    line each time the run's round, phase or loss changes."""
    with watching(plan.out_dir, rounds=plan.rounds, say=say or (lambda line: None)):
        if engine == "processes":
            return LocalFederation(plan).run()
        return SimulatedFederation(plan).run_in_child(cores=cores or len(os.sched_getaffinity(0)))
