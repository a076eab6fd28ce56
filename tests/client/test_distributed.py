"""A site of several processes: `torchrun ... -m fedlora_worker` with two gloo ranks on the CPU.

Rank 0 alone joins the coordinator; both ranks train, each on its rows of every batch, and the
committed update must be the one a single process makes on the whole batches.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.numpy import load_file

from fedlora_common.plans import LoraSpec, RunSpec, TrainingPlan
from fedlora_server.config import RunSettings
from fedlora_server.planning import RoundPlans
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import WorkerSettings
from fedlora_worker.data import TokenizedData, load_records, tokenize
from fedlora_worker.distributed import Launch, SiteGroup, site_model
from fedlora_worker.modeling import SiteModel, global_state, load_model
from fedlora_worker.training import train_locally

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SAME_UPDATE = 1e-5
"""Bound on |u_2 - u_1| / |u_1|, the committed update of two ranks against one process's: the same
batches with the gradient summed in another order (rows split over ranks, then micro-batches) and
one float32 round trip through the coordinator's mean; 4.0e-7 measured here."""

TOKEN = "two-rank-site-token"


def _settings(tmp_path: Path, base: Path) -> RunSettings:
    return RunSettings.model_validate(
        {
            "run_id": "two-ranks",
            "base_model": str(base),
            "mode": "lora",
            "rounds": 1,
            "min_workers": 1,
            "workers": [{"id": "site", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}],
            "secure_aggregation": {"enabled": False},
            "state_dir": tmp_path / "coordinator",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},  # no dropout: ranks draw other masks than one process
            "training": {
                "local_steps": 3,
                "batch_size": 4,
                "micro_batch_size": 1,
                "gradient_checkpointing": True,
                "learning_rate": 1e-2,
                "lr_schedule": "cosine",
                "warmup_steps": 1,
                "max_seq_len": 64,
            },
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 50},
        }
    )


def _worker_yaml(tmp_path: Path, base: Path, port: int, sentences: list[str]) -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences), encoding="utf-8")
    config = tmp_path / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "worker_id": "site",
                "token": TOKEN,
                "coordinator": f"127.0.0.1:{port}",
                "base_model": str(base),
                "data": {"train": [str(train)]},
                "progress": False,
                "threads": 1,
            }
        ),
        encoding="utf-8",
    )
    return config


@pytest.mark.slow
def test_two_gloo_ranks_commit_the_update_one_process_makes_on_the_same_batches(
    tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]
) -> None:
    # Prepare: a coordinator in this process, a site of two ranks in `torchrun` (free ports: --standalone).
    settings = _settings(tmp_path, tiny_base_model)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # Execute
    with CoordinatorServer(settings=settings) as server:
        config = _worker_yaml(tmp_path, tiny_base_model, server.port, make_sentences(24, 11))
        site = subprocess.run(
            [*command, "-m", "fedlora_worker", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert server.wait_finished(), site.stderr[-3000:]
        server.write_report()

    # Assert: one worker joined (rank 0), both ranks exited cleanly, and the committed update is the
    # update one process makes from the same initial adapter on the same batches.
    assert site.returncode == 0, site.stderr[-3000:]
    report = json.loads((settings.state_dir / "report.json").read_text())
    assert [r["participants"] for r in report["rounds"]] == [["site"]]
    assert [w["id"] for w in report["workers"]] == ["site"]
    joins = [json.loads(line) for line in site.stderr.splitlines() if '"event": "joined"' in line]
    assert [event["rank"] for event in joins] == [0]
    run = RunSpec(
        run_id="two-ranks",
        mode="lora",
        aggregation="fedavg",
        base_model=str(tiny_base_model),
        lora=settings.lora,
        total_rounds=1,
        seed=settings.seed,
    )
    alone = load_model(run, SiteModel(path=str(tiny_base_model)))
    initial = global_state(alone)
    data = tokenize(load_records([tmp_path / "train.jsonl"]), alone.tokenizer, max_seq_len=64)
    train_locally(alone.model, data, RoundPlans(settings, None).training(1), pad_id=alone.pad_id)
    one = global_state(alone)
    committed = load_file(str(settings.state_dir / report["adapter_path"] / "adapter_model.safetensors"))
    assert set(committed) == set(one)
    two_ranks = np.concatenate([(committed[n] - initial[n]).ravel() for n in sorted(one)])
    one_process = np.concatenate([(one[n] - initial[n]).ravel() for n in sorted(one)])
    assert np.abs(one_process).max() > 1e-3  # it trained
    assert np.linalg.norm(two_ranks - one_process) / np.linalg.norm(one_process) < SAME_UPDATE


def _closing_rank(
    rank: int, store: str, train: str, rank_1_may_close: Event, close_timeout_s: float, results: Any
) -> None:
    """One process of a two-rank site on the CPU: rank 0 closes at once, rank 1 follows it to the stop
    message and closes once it may; each reports its native threads before the site and after closing."""
    torch.set_num_threads(1)
    torch.ones(1).add_(1)  # any pool torch starts lazily is there before counting
    before = psutil.Process().num_threads()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group = SiteGroup(
        Launch(rank=rank, world_size=2), SiteModel(path="unused"), close_timeout=timedelta(seconds=close_timeout_s)
    )
    if rank == 1:
        settings = WorkerSettings.model_validate(
            {"worker_id": "site", "token": "t", "base_model": "unused", "data": {"train": [train]}}
        )
        group.follow(settings)
        rank_1_may_close.wait(timeout=120)
    group.close()
    group.close()  # twice: a no-op
    results.put((rank, before, psutil.Process().num_threads()))


def _close_two_ranks(tmp_path: Path, *, rank_1_waits: bool, close_timeout_s: float) -> dict[int, tuple[int, int]]:
    """Run both ranks to their close; {rank: (threads before, threads after)}."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    rank_1_may_close = context.Event()
    if not rank_1_waits:
        rank_1_may_close.set()
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "kalo miren."}) + "\n", encoding="utf-8")
    args = (str(tmp_path / "store"), str(train), rank_1_may_close, close_timeout_s, results)
    ranks = [context.Process(target=_closing_rank, args=(rank, *args)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    reports = {}
    try:
        rank, before, after = results.get(timeout=300)
        reports[rank] = (before, after)
        rank_1_may_close.set()  # rank 0 closed (or rank 1 did, not waiting)
        rank, before, after = results.get(timeout=300)
        reports[rank] = (before, after)
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in ranks] == [0, 0]
    return reports


@pytest.mark.slow
def test_closing_a_site_group_leaves_no_gloo_thread_to_outlive_the_interpreter(tmp_path: Path) -> None:
    # Prepare / Execute: rank 0 releases rank 1 and both close, as after a finished run.
    reports = _close_two_ranks(tmp_path, rank_1_waits=False, close_timeout_s=120)

    # Assert: every thread gloo started is joined by close(); one left running at interpreter exit
    # aborts the process if it still holds a tensor ("terminate called without an active exception").
    assert reports == {rank: (before, before) for rank, (before, _) in reports.items()}
    assert sorted(reports) == [0, 1]


@pytest.mark.slow
def test_a_rank_that_does_not_come_to_close_is_waited_for_only_the_close_timeout(tmp_path: Path) -> None:
    # Prepare / Execute: rank 1 takes the stop message but closes only after rank 0 has closed.
    reports = _close_two_ranks(tmp_path, rank_1_waits=True, close_timeout_s=2)

    # Assert: rank 0 gave up waiting after its timeout, and still left no gloo thread behind; so did rank 1.
    assert reports == {rank: (before, before) for rank, (before, _) in reports.items()}
    assert sorted(reports) == [0, 1]


def test_torchrun_environment_places_each_process_on_its_own_gpu(tmp_path: Path) -> None:
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    settings = WorkerSettings.model_validate(
        {"worker_id": "site", "token": "t", "base_model": "/models/base", "data": {"train": [tmp_path / "t.jsonl"]}}
    )

    launch = Launch.from_environment(environ)
    alone = Launch.from_environment({})
    on_gpu = site_model(settings.model_copy(update={"device": "cuda"}), launch)
    one_per_node = site_model(settings.model_copy(update={"device": "cuda"}), Launch(1, 2, 0, 1))

    assert launch == Launch(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert launch.distributed
    assert not alone.distributed
    assert on_gpu.device == "cuda:1"
    assert one_per_node.device == "cuda:0"
    assert site_model(settings, launch).device == "cpu"


def test_device_map_auto_refuses_more_processes_than_gpus(tmp_path: Path) -> None:
    settings = WorkerSettings.model_validate(
        {
            "worker_id": "site",
            "token": "t",
            "base_model": "/models/base",
            "data": {"train": [tmp_path / "t.jsonl"]},
            "device_map": "auto",
        }
    )
    launch = Launch(rank=0, world_size=2, local_rank=0, local_world_size=2)

    with pytest.raises(ValueError, match=r"^device_map: auto with 2 processes on a node of 0 GPU\(s\)"):
        site_model(settings, launch)


def test_a_base_placed_by_device_map_auto_trains_where_accelerate_put_it(tiny_base_model: Path) -> None:
    run = RunSpec(
        run_id="r", mode="qlora", aggregation="fedavg", base_model="b", lora=LoraSpec(rank=4), total_rounds=1, seed=0
    )
    site = SiteModel(path=str(tiny_base_model), device_map="auto", dtype="auto", max_memory_per_gpu="1GiB")

    loaded = load_model(run, site)
    before = global_state(loaded)
    rows = [[1, *range(10, 40), 2]] * 4
    data = TokenizedData(input_ids=rows, labels=[list(r) for r in rows])
    train_locally(loaded.model, data, TrainingPlan(seed=0, local_steps=2, batch_size=2), pad_id=loaded.pad_id)

    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}  # no GPU here: all on the CPU
    assert next(p for p in loaded.model.parameters()).dtype in (torch.float32, torch.uint8)
    assert any(not np.array_equal(before[n], after) for n, after in global_state(loaded).items())
