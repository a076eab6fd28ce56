"""A small lab federation's files (run.yaml, sites, worker.yaml) written as a simulation reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora_lab.datagen import DataSpec
from fedlora_lab.federation import FederationPlan
from fedlora_lab.simulation import SimulatedFederation


def small_plan(out: Path, base: Path, *, workers: int = 3, rounds: int = 1, **run: Any) -> FederationPlan:
    return FederationPlan(
        out_dir=out,
        base_model=base,
        workers=workers,
        rounds=rounds,
        data=DataSpec(n_train=12, n_eval=3, n_canaries=2, n_controls=1),
        run={"training": {"local_steps": 2, "batch_size": 4, "max_seq_len": 64}, **run},
    )


def written(plan: FederationPlan) -> tuple[Path, list[Path]]:
    """run.yaml and the sites' worker.yaml files, with each site's data."""
    return SimulatedFederation(plan).prepare()
