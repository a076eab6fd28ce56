"""State that is checked and movable: every inconsistency stops the coordinator with one line, never a new run."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from fedlora_common.messages import TaskKind, UploadKind
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.aggregation import Aggregator
from fedlora_server.artifacts import point_latest, write_artifact
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.machine import PhaseMachine
from fedlora_server.metrics import ServerMetrics
from fedlora_server.planning import RoundPlans
from fedlora_server.report import build_report
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import SqliteStore, StateError
from fedlora_server.versions import Versions
from tests.server.conftest import (
    ADAPTER_CONFIG,
    MANIFEST,
    WORKERS,
    Clock,
    ScriptedAttempts,
    initial_vector,
    initialized,
    run_settings,
    upload_header,
    vector_chunks,
)
from tests.server.statedir import files_of, left_by_kill_9, one_round_committed, start_refused


def _coordinator(state_dir: Path, **overrides: object) -> Coordinator:
    settings = run_settings(state_dir, **overrides)
    store = SqliteStore(state_dir / "coordinator.db")
    try:
        return Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock())
    except StateError:
        store.close()
        raise


def test_an_emptied_database_beside_artifacts_stops_with_one_line_naming_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)
    (state / "coordinator.db").write_bytes(b"")
    for leftover in state.glob("coordinator.db-*"):
        leftover.unlink()

    with pytest.raises(StateError, match="artifacts: holds 2 committed versions but the store records no run"):
        _coordinator(state)
    finished = start_refused(state)

    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1
    assert "artifacts" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_truncated_database_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)
    db = state / "coordinator.db"
    for leftover in state.glob("coordinator.db-*"):
        leftover.unlink()
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])

    finished = start_refused(state)

    assert finished.returncode == 2
    assert "coordinator.db" in finished.stderr
    assert finished.stderr.count("\n") == 1


def test_a_corrupt_artifact_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)
    weights = state / "artifacts" / "v000001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))

    with pytest.raises(StateError, match="v000001: version 1"):
        _coordinator(state)
    finished = start_refused(state)

    assert finished.returncode == 2
    assert "v000001" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_state_directory_moved_elsewhere_resumes_from_its_new_place(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "state", tmp_path / "new" / "state"
    committed = one_round_committed(old)
    shutil.move(old, new)

    resumed = _coordinator(new)
    for w in WORKERS:
        resumed.join(w, 100)

    np.testing.assert_array_equal(resumed.global_model("legal", 1).vector, committed)
    assert (new / "adapter").resolve() == (new / "artifacts" / "v000001").resolve()


def test_a_state_directory_of_another_run_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)

    with pytest.raises(StateError, match="holds run 'test-run', not 'another'"):
        _coordinator(state, run_id="another")


def test_no_adapter_is_published_before_round_one_commits(tmp_path: Path) -> None:
    state = tmp_path / "state"
    coordinator = _coordinator(state)
    initialized(coordinator)

    assert coordinator.poll("legal").kind is TaskKind.TRAIN
    assert (state / "artifacts" / "v000000").is_dir()
    assert not (state / "adapter").exists()


def test_plaintext_off_loopback_needs_insecure_and_then_warns(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    values = json.loads(run_settings(tmp_path / "state").model_dump_json())
    values["listen"]["host"] = "0.0.0.0"
    config.write_text(json.dumps(values))

    with pytest.raises(ConfigError, match=r"listen: plaintext gRPC on 0\.0\.0\.0") as refused:
        load_settings(RunSettings, ["--config", str(config)])
    values["listen"]["insecure"] = True
    config.write_text(json.dumps(values))
    settings = load_settings(RunSettings, ["--config", str(config)])
    with structlog.testing.capture_logs() as logs, CoordinatorServer(settings=settings):
        pass

    assert "\n" not in str(refused.value)
    assert any(entry["event"] == "plaintext_listener" for entry in logs)


def _overwrite_log_header(state_dir: Path) -> None:
    log = state_dir / "coordinator.db-wal"
    with log.open("r+b") as f:
        f.write(b"\xa5" * 32)


def _garbage_mid_log(state_dir: Path) -> None:
    log = state_dir / "coordinator.db-wal"
    with log.open("r+b") as f:
        f.seek(32 + 5 * (24 + 4096) + 24 + 1000)  # inside the sixth frame's page, well before the log's end
        f.write(np.random.default_rng(3).bytes(64))


def _remove_database(state_dir: Path) -> None:
    (state_dir / "coordinator.db").unlink()


def _remove_database_and_log(state_dir: Path) -> None:
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
        (state_dir / name).unlink()


def _versions_beyond_a_crash(state_dir: Path) -> None:
    shutil.copytree(state_dir / "artifacts" / "v000001", state_dir / "artifacts" / "v000003")


def _corrupt_latest_version(state_dir: Path) -> None:
    weights = state_dir / "artifacts" / "v000001" / "adapter_model.safetensors"
    with weights.open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_overwrite_log_header, "coordinator.db-wal: the log header is damaged"),
        (_garbage_mid_log, "coordinator.db-wal: frame 6 of"),
        (_remove_database, "coordinator.db-wal: a write-ahead log without its database coordinator.db"),
        (_remove_database_and_log, "artifacts: holds 2 committed versions but the store records no run"),
        (_versions_beyond_a_crash, "v000003: version 3 is on disk but the store's latest is version 1"),
        (_corrupt_latest_version, "v000001: version 1 cannot be read"),
    ],
)
def test_a_refused_start_says_why_in_one_line_and_leaves_every_file_as_it_was(
    tmp_path: Path, damage: Callable[[Path], None], named: str
) -> None:
    # Prepare: what a kill -9 leaves (every transaction in the log), then the damage.
    state = tmp_path / "state"
    left_by_kill_9(state)
    damage(state)
    before = files_of(state)

    # Execute
    finished = start_refused(state)

    # Assert
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    assert named in finished.stderr
    assert "Traceback" not in finished.stderr
    assert files_of(state) == before


def test_a_torn_log_tail_resumes_at_the_last_whole_transaction(tmp_path: Path) -> None:
    state = tmp_path / "state"
    committed = left_by_kill_9(state)
    log = state / "coordinator.db-wal"
    os.truncate(log, log.stat().st_size - 1000)  # the last frame cut short, as a crash mid-write leaves it

    resumed = _coordinator(state)
    for w in WORKERS:
        resumed.join(w, 100)

    np.testing.assert_array_equal(resumed.global_model("legal", 1).vector, committed)


def test_a_version_written_but_never_recorded_is_adopted_by_the_retried_commit(tmp_path: Path) -> None:
    # Prepare: the run crashed between writing version 1 and recording it; the retried round yields the same model.
    expected = one_round_committed(tmp_path / "reference")
    state = tmp_path / "state"
    coordinator = _coordinator(state)
    initialized(coordinator)
    shutil.copytree(tmp_path / "reference" / "artifacts" / "v000001", state / "artifacts" / "v000001")

    # Execute
    for w in WORKERS:
        delta = np.full(MANIFEST.numel, 0.5, dtype=np.float32)
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))

    # Assert
    assert coordinator.phase == "evaluate"
    np.testing.assert_array_equal(coordinator.global_model("legal", 1).vector, expected)
    assert sorted(p.name for p in (state / "artifacts").iterdir()) == ["v000000", "v000001"]
    assert (state / "adapter").resolve() == (state / "artifacts" / "v000001").resolve()


def test_another_model_left_at_a_versions_name_is_moved_aside_never_deleted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    coordinator = _coordinator(state)
    initialized(coordinator)
    zeros = np.zeros(MANIFEST.numel, dtype=np.float32)
    stray = write_artifact(
        state / "artifacts", 1, mode="lora", manifest=MANIFEST, vector=zeros, config_json=ADAPTER_CONFIG
    )
    left = files_of(stray.path)

    for w in WORKERS:
        delta = np.full(MANIFEST.numel, 0.5, dtype=np.float32)
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))

    assert coordinator.phase == "evaluate"
    np.testing.assert_array_equal(coordinator.global_model("legal", 1).vector, initial_vector() + np.float32(0.5))
    assert files_of(state / "artifacts" / ".v000001.set-aside-1") == left


def _machine(state_dir: Path, store: SqliteStore, aggregator: Aggregator) -> PhaseMachine:
    settings, clock = run_settings(state_dir, min_workers=2), Clock()
    return PhaseMachine(
        settings=settings,
        store=store,
        metrics=ServerMetrics(CollectorRegistry()),
        versions=Versions(state_dir=state_dir, mode="lora", aggregation="fedavg", store=store, clock=clock),
        aggregator=aggregator,
        plans=RoundPlans(settings, None),
        privacy=None,
        clock=clock,
        spool_dir=state_dir / "spool",
    )


def test_an_excluded_dealer_stays_out_of_its_round_when_the_coordinator_restarts(tmp_path: Path) -> None:
    # Prepare: round 1's first attempt shows legal cheating; the retry without it is open when the coordinator dies.
    state = tmp_path / "state"
    first_store, first_attempts = SqliteStore(state / "coordinator.db"), ScriptedAttempts(cheat=True)
    initialized(_machine(state, first_store, first_attempts))  # type: ignore[arg-type]
    assert [p.participants for p in first_attempts.plans] == [WORKERS, ("clinical", "finance")]
    first_store.close()

    # Execute: a new coordinator on the same state; every worker comes back, legal first.
    store, attempts = SqliteStore(state / "coordinator.db"), ScriptedAttempts(cheat=False)
    restarted = _machine(state, store, attempts)
    for w in ("legal", "clinical", "finance"):
        restarted.join(w, 100)

    # Assert
    assert [(p.round, p.attempt, p.participants) for p in attempts.plans] == [(1, 3, ("clinical", "finance"))]
    assert restarted.poll("legal").kind is TaskKind.WAIT
    store.close()


def test_a_missing_older_version_is_reported_and_a_stale_adapter_link_repaired_on_restart(tmp_path: Path) -> None:
    # Prepare: a finished run; then version 0 is deleted and `adapter` points at it.
    state = tmp_path / "state"
    one_round_committed(state, rounds=1)
    shutil.rmtree(state / "artifacts" / "v000000")
    point_latest(state / "adapter", state / "artifacts" / "v000000")

    # Execute
    with structlog.testing.capture_logs() as logs:
        server = CoordinatorServer(settings=run_settings(state, rounds=1))
    for w in WORKERS:
        server.coordinator.join(w, 100)
    report = build_report(run_settings(state, rounds=1), server._store)
    server.shutdown()

    # Assert: reported, repaired, and the finished run stands on its latest version.
    damaged = [e for e in logs if e["event"] == "artifact_damaged"]
    assert [(e["version"], e["fault"], e["log_level"]) for e in damaged] == [(0, "missing", "warning")]
    assert [e["now"] for e in logs if e["event"] == "adapter_link_repaired"] == ["artifacts/v000001"]
    assert (state / "adapter").resolve() == (state / "artifacts" / "v000001").resolve()
    assert server.coordinator.finished.is_set()
    assert server.coordinator.failure is None
    assert report["adapter_path"] == "adapter"  # relative to the report's own directory, the state directory
