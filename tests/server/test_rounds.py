"""A whole run over the real wire with numpy workers: phases, aggregation, commits, report."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedlora_common.aggregation import weighted_mean
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.server import CoordinatorServer
from tests.server.conftest import MANIFEST, WORKERS, Wire, connect, initial_vector, run_settings, start_round_one


def test_a_run_averages_updates_by_examples_and_commits_each_round(server: CoordinatorServer, wire: Wire) -> None:
    start_round_one(wire)
    rng = np.random.default_rng(1)
    examples = {"clinical": 100, "finance": 300, "legal": 50}
    current = initial_vector()

    for round_ in (1, 2):
        deltas = {w: rng.normal(size=MANIFEST.numel).astype(np.float32) for w in WORKERS}
        for w in WORKERS:
            task = wire.poll(w)
            assert (task.kind, task.round) == (pb.TASK_KIND_TRAIN, round_)
            wire.upload(w, deltas[w], round_=round_, base_version=round_ - 1, examples=examples[w])
        expected = current + weighted_mean([deltas[w] for w in WORKERS], [examples[w] for w in WORKERS])
        header, payload = wire.download("legal", round_)
        assert header.model.version == round_
        np.testing.assert_allclose(np.frombuffer(payload, dtype=np.float32), expected, rtol=1e-6, atol=1e-6)
        for w in WORKERS:
            assert wire.poll(w).kind == pb.TASK_KIND_EVALUATE
            wire.report(w, round_, round_, loss=3.0 - round_)
        current = expected

    assert wire.poll("clinical").kind == pb.TASK_KIND_FINISHED
    assert server.coordinator.finished.is_set()
    server.write_report()
    report = json.loads((server._settings.state_dir / "report.json").read_text())
    assert report["base_eval_loss"] == 3.0
    assert [r["eval_loss"] for r in report["rounds"]] == [2.0, 1.0]
    assert all(r["upload_bytes"] == 3 * MANIFEST.nbytes for r in report["rounds"])
    adapter = server._settings.state_dir / report["adapter_path"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    np.testing.assert_allclose(saved[MANIFEST.names[0]].reshape(-1), current[: MANIFEST.tensors[0].numel], rtol=1e-6)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_a_worker_missing_the_deadline_is_dropped_when_enough_remain(tmp_path: Path) -> None:
    clock = [1000.0]
    settings = run_settings(tmp_path, min_workers=2, rounds=1)
    with CoordinatorServer(settings=settings, clock=lambda: clock[0]) as server, connect(server) as wire:
        start_round_one(wire)
        for w in ("clinical", "finance"):
            wire.upload(w, np.ones(MANIFEST.numel, dtype=np.float32), round_=1)

        clock[0] += 10**6
        task = wire.poll("clinical")

        assert task.kind == pb.TASK_KIND_EVALUATE
        record = [r for r in server._store.rounds() if r.round == 1][-1]
        assert record.dropped == ("legal",)


def test_too_few_updates_fail_the_round_and_it_is_retried(tmp_path: Path) -> None:
    clock = [1000.0]
    settings = run_settings(tmp_path, min_workers=2, rounds=1)
    with CoordinatorServer(settings=settings, clock=lambda: clock[0]) as server, connect(server) as wire:
        start_round_one(wire)
        wire.upload("clinical", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)

        clock[0] += 10**6
        task = wire.poll("clinical")

        assert (task.kind, task.round) == (pb.TASK_KIND_TRAIN, 1)
        attempts = [(r.attempt, r.status) for r in server._store.rounds() if r.round == 1]
        assert attempts == [(1, "failed"), (2, "training")]
        assert server._store.latest_artifact().version == 0


def test_downloads_are_counted_in_the_round_they_happen(server: CoordinatorServer, wire: Wire) -> None:
    start_round_one(wire)
    for w in WORKERS:
        wire.upload(w, np.zeros(MANIFEST.numel, dtype=np.float32), round_=1)

    for w in WORKERS:
        wire.download(w, 1)
        wire.report(w, 1, 1)

    record = [r for r in server._store.rounds() if r.round == 1][-1]
    assert record.status == "completed"
    assert record.download_bytes == 3 * MANIFEST.nbytes
