"""Two engines, one code: the same small federation, same seeds and threads, commits the same adapter.

Secure aggregation sums integers mod 2^32, so the order in which updates arrive cannot matter:
bit for bit. Plain FedAvg folds floats into a float64 sum in arrival order (which the scheduler
decides, across processes and across a simulation's threads alike): within one float32 rounding step.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from safetensors.numpy import load_file

from fedlora_lab.datagen import DataSpec
from fedlora_lab.federation import FederationPlan, FederationResult, LocalFederation
from fedlora_lab.model_factory import MadeModel
from fedlora_lab.simulation import SimulatedFederation

THREADS = 1  # numerics depend on it: every worker process and the simulation use one torch thread


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _plan(out: Path, base: Path, *, secure: bool, workers: int, rounds: int) -> FederationPlan:
    return FederationPlan(
        out_dir=out,
        base_model=base,
        workers=workers,
        rounds=rounds,
        seed=7,
        run_id="cross-engine",
        secure_aggregation=secure,
        threads_per_worker=THREADS,
        data=DataSpec(n_train=12, n_eval=3, n_canaries=2, n_controls=1),
        run={"training": {"local_steps": 3, "batch_size": 4, "max_seq_len": 64}, "timeouts": {"poll_wait_ms": 100}},
        timeout=timedelta(minutes=5),  # a worker that cannot start leaves the coordinator waiting for it
    )


def _adapter(result: FederationResult) -> dict[str, npt.NDArray[np.float32]]:
    return load_file(str(result.out_dir / result.report["adapter_path"] / "adapter_model.safetensors"))


def _both(tmp_path: Path, base: Path, **plan: Any) -> tuple[FederationResult, FederationResult]:
    simulated = SimulatedFederation(_plan(tmp_path / "simulation", base, **plan)).run()
    processes = LocalFederation(_plan(tmp_path / "processes", base, **plan)).run()
    assert set(simulated.exit_codes.values()) == {0}
    assert set(processes.exit_codes.values()) == {0}
    return simulated, processes


def _per_round(result: FederationResult, field: str) -> list[Any]:
    return [r[field] for r in result.report["rounds"]]


@pytest.mark.slow
def test_secure_aggregation_commits_the_same_adapter_bit_for_bit_on_both_engines(
    tmp_path: Path, lab_model: MadeModel, one_thread: None
) -> None:
    simulated, processes = _both(tmp_path, lab_model.path, secure=True, workers=2, rounds=2)

    sim, proc = _adapter(simulated), _adapter(processes)
    assert sim.keys() == proc.keys()
    assert all(np.array_equal(sim[name], proc[name]) for name in sim)
    assert any(np.abs(sim[name]).max() > 0 for name in sim if "lora_B" in name)  # B starts at zero: it trained
    for field in ("train_loss", "eval_loss", "upload_bytes", "download_bytes"):
        assert _per_round(simulated, field) == _per_round(processes, field), field
    assert simulated.report["base_eval_loss"] == processes.report["base_eval_loss"]


@pytest.mark.slow
def test_plain_fedavg_commits_the_same_adapter_within_float32_rounding_on_both_engines(
    tmp_path: Path, lab_model: MadeModel, one_thread: None
) -> None:
    simulated, processes = _both(tmp_path, lab_model.path, secure=False, workers=3, rounds=1)

    sim, proc = _adapter(simulated), _adapter(processes)
    assert sim.keys() == proc.keys()
    for name in sim:
        ulp = np.spacing(np.maximum(np.abs(sim[name]), np.abs(proc[name])))
        assert (np.abs(sim[name] - proc[name]) <= ulp).all(), name
    assert any(np.abs(sim[name]).max() > 0 for name in sim if "lora_B" in name)
    assert _per_round(simulated, "train_loss") == pytest.approx(_per_round(processes, "train_loss"), rel=1e-12)
    assert _per_round(simulated, "upload_bytes") == _per_round(processes, "upload_bytes")
