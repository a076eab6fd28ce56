"""One contract, every backend: the same tests run against the in-memory and the SQLite store."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora_server.store import (
    ArtifactRecord,
    CoordinatorStore,
    DuplicateUploadError,
    MemoryStore,
    MetricsRecord,
    RoundRecord,
    RunEvent,
    RunRecord,
    SqliteStore,
    StateError,
    StoreError,
    UploadRecord,
    WorkerRecord,
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoordinatorStore]:
    backend: CoordinatorStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "c.db")
    yield backend
    backend.close()


def _upload(worker: str, attempt: int = 1) -> UploadRecord:
    return UploadRecord(1, attempt, worker, 10, 400, "ab" * 32, 2.5)


def test_a_store_holds_one_run(store: CoordinatorStore) -> None:
    store.create_run(RunRecord("run-a", "{}", 1.0))
    store.create_run(RunRecord("run-a", "{}", 2.0))

    with pytest.raises(StoreError, match="run-a"):
        store.create_run(RunRecord("run-b", "{}", 3.0))
    assert store.load_run() == RunRecord("run-a", "{}", 1.0)


def test_rejoining_worker_updates_its_example_count(store: CoordinatorStore) -> None:
    store.upsert_worker(WorkerRecord("legal", 10, 1.0))
    store.upsert_worker(WorkerRecord("clinical", 5, 1.0))
    store.upsert_worker(WorkerRecord("legal", 12, 2.0))

    assert [(w.worker_id, w.num_examples) for w in store.workers()] == [("clinical", 5), ("legal", 12)]


def test_a_worker_that_leaves_keeps_its_reason_until_it_rejoins(store: CoordinatorStore) -> None:
    store.upsert_worker(WorkerRecord("legal", 10, 1.0))
    store.upsert_worker(WorkerRecord("legal", 10, 5.0, left_reason="CUDA out of memory"))
    left = store.workers()
    store.upsert_worker(WorkerRecord("legal", 11, 9.0))

    assert left == [WorkerRecord("legal", 10, 1.0, left_reason="CUDA out of memory")]
    assert store.workers() == [WorkerRecord("legal", 11, 1.0)]


def test_a_failed_run_keeps_its_reason(store: CoordinatorStore) -> None:
    store.create_run(RunRecord("run-a", "{}", 1.0))

    store.fail_run("every worker left: legal: data unreadable")

    assert store.load_run() == RunRecord("run-a", "{}", 1.0, failure="every worker left: legal: data unreadable")


def test_an_upload_is_recorded_once_per_attempt(store: CoordinatorStore) -> None:
    store.record_upload(_upload("legal"))

    with pytest.raises(DuplicateUploadError):
        store.record_upload(_upload("legal"))
    store.record_upload(_upload("legal", attempt=2))
    assert store.uploads(1, 1) == [_upload("legal")]
    assert store.uploads(1, 2) == [_upload("legal", attempt=2)]


def test_artifact_versions_only_move_forward(store: CoordinatorStore) -> None:
    first = ArtifactRecord(0, 0, "00" * 32, 100, "/a/v0", 1.0)
    second = ArtifactRecord(1, 1, "11" * 32, 100, "/a/v1", 2.0)
    store.commit_artifact(first)
    store.commit_artifact(second)

    with pytest.raises(StoreError, match="not newer"):
        store.commit_artifact(ArtifactRecord(1, 2, "22" * 32, 100, "/a/v1b", 3.0))
    assert store.artifacts() == [first, second]
    assert store.latest_artifact() == second


def test_committing_a_version_again_with_its_digest_changes_nothing(store: CoordinatorStore) -> None:
    first = ArtifactRecord(0, 0, "00" * 32, 100, "artifacts/v000000", 1.0)
    store.commit_artifact(first)

    store.commit_artifact(ArtifactRecord(0, 0, "00" * 32, 100, "artifacts/v000000", 5.0))  # a retried commit

    with pytest.raises(StoreError, match="not newer"):
        store.commit_artifact(ArtifactRecord(0, 0, "ff" * 32, 100, "artifacts/v000000", 6.0))
    assert store.artifacts() == [first]


def test_rounds_are_kept_per_attempt_in_order(store: CoordinatorStore) -> None:
    failed = RoundRecord(1, 1, "failed", ("a", "b"), 1.0, 9.0, 9.0, dropped=("b",), excluded=("b",), failure="bad")
    retried = RoundRecord(1, 2, "training", ("a",), 10.0, 20.0)
    store.save_round(retried)
    store.save_round(failed)
    done = RoundRecord(1, 2, "completed", ("a",), 10.0, 20.0, 15.0, (), 2.0, 1.5, 400, 800)
    store.save_round(done)

    assert store.rounds() == [failed, done]


def test_metrics_are_replaced_per_worker_and_round(store: CoordinatorStore) -> None:
    store.record_metrics(MetricsRecord(1, "legal", 1, 3.0, 100, 0.0, 0.0))
    store.record_metrics(MetricsRecord(1, "legal", 1, 2.5, 120, 0.0, 0.0))
    store.record_metrics(MetricsRecord(2, "legal", 2, 2.0, 120, 0.0, 0.0, 1.5, '{"overall": {}}'))

    assert store.metrics(1) == [MetricsRecord(1, "legal", 1, 2.5, 120, 0.0, 0.0)]
    assert store.metrics(2) == [MetricsRecord(2, "legal", 2, 2.0, 120, 0.0, 0.0, 1.5, '{"overall": {}}')]


def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    first.create_run(RunRecord("run-a", "{}", 1.0))
    first.commit_artifact(ArtifactRecord(0, 0, "00" * 32, 100, "/a/v0", 1.0))
    first.close()

    reopened = SqliteStore(path)

    assert reopened.load_run() == RunRecord("run-a", "{}", 1.0)
    assert reopened.latest_artifact() == ArtifactRecord(0, 0, "00" * 32, 100, "/a/v0", 1.0)
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_sqlite_writes_no_schema_beside_a_log_whose_database_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "c.db-wal"
    log.write_bytes(b"\x37\x7f\x06\x82" + bytes(28))

    with pytest.raises(StateError, match=r"c\.db-wal: a write-ahead log without its database c\.db"):
        SqliteStore(tmp_path / "c.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db-wal"]


def test_a_sqlite_snapshot_holds_what_the_log_holds_and_writes_nothing(tmp_path: Path) -> None:
    # Prepare: a store whose writes are all still in its log, and its files as they are now.
    path = tmp_path / "c.db"
    live = SqliteStore(path)
    live.create_run(RunRecord("run-a", "{}", 1.0))
    live.commit_artifact(ArtifactRecord(0, 0, "00" * 32, 100, "artifacts/v000000", 1.0))
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}

    # Execute
    snapshot = SqliteStore.snapshot(path)
    snapshot.fail_run("stays in memory")
    seen = (snapshot.load_run(), snapshot.artifacts())
    snapshot.close()

    # Assert
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == files
    assert seen == (RunRecord("run-a", "{}", 1.0, "stays in memory"), live.artifacts())
    assert live.load_run() == RunRecord("run-a", "{}", 1.0)
    live.close()


def test_the_runs_journal_keeps_amendments_retries_and_stop_requests_in_order(store: CoordinatorStore) -> None:
    store.create_run(RunRecord("run-a", '{"rounds": 3}', 1.0))
    store.fail_run("2 of the 3 workers needed remain")

    store.amend_run('{"rounds": 5}', RunEvent(2.0, "amended", '[["rounds", 3, 5]]'))
    store.reopen_run(RunEvent(3.0, "retried", '{"failure": "2 of the 3 workers needed remain"}'))
    store.record_event(RunEvent(4.0, "stop_requested", '{"now": false}'))

    run = store.load_run()
    assert run is not None
    assert (run.config_json, run.failure) == ('{"rounds": 5}', "")
    assert [(e.at, e.kind) for e in store.events()] == [(2.0, "amended"), (3.0, "retried"), (4.0, "stop_requested")]


def test_a_store_without_a_run_refuses_to_amend_or_reopen_it(store: CoordinatorStore) -> None:
    with pytest.raises(StoreError):
        store.amend_run("{}", RunEvent(1.0, "amended", "[]"))
    with pytest.raises(StoreError):
        store.reopen_run(RunEvent(1.0, "retried", "{}"))
    assert store.events() == []
