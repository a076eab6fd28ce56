"""The durable store: one SQLite file in WAL mode, every write in its own committed transaction."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fedlora_server.errors import Unavailable
from fedlora_server.store.base import (
    ArtifactRecord,
    CoordinatorStore,
    DuplicateUploadError,
    MetricsRecord,
    RoundRecord,
    RunEvent,
    RunRecord,
    StateError,
    StoreError,
    UploadRecord,
    WorkerRecord,
)
from fedlora_server.store.wal import WalDamage, WalLog, committed_image, read_wal

__all__ = ["SqliteStore", "wal_of"]

BUSY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, created_at REAL NOT NULL, failure TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS worker (
    worker_id TEXT PRIMARY KEY, num_examples INTEGER NOT NULL, joined_at REAL NOT NULL,
    left_reason TEXT NOT NULL DEFAULT '', rank INTEGER NOT NULL DEFAULT 0,
    base_precision TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS round (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
    participants TEXT NOT NULL, started_at REAL NOT NULL, deadline_at REAL NOT NULL,
    finished_at REAL, dropped TEXT NOT NULL, train_loss REAL, eval_loss REAL,
    upload_bytes INTEGER NOT NULL, download_bytes INTEGER NOT NULL, secagg TEXT NOT NULL,
    excluded TEXT NOT NULL DEFAULT '[]', failure TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (round, attempt));
CREATE TABLE IF NOT EXISTS upload (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, worker_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
    train_loss REAL NOT NULL, PRIMARY KEY (round, attempt, worker_id));
CREATE TABLE IF NOT EXISTS artifact (
    version INTEGER PRIMARY KEY, round INTEGER NOT NULL, sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, path TEXT NOT NULL, committed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL, worker_id TEXT NOT NULL, version INTEGER NOT NULL,
    eval_loss REAL NOT NULL, eval_tokens INTEGER NOT NULL, train_loss REAL NOT NULL,
    tokens_per_second REAL NOT NULL, record_epsilon REAL, memorization_json TEXT NOT NULL,
    PRIMARY KEY (round, worker_id));
CREATE TABLE IF NOT EXISTS event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""

MIGRATIONS = (
    ("round", "excluded", "TEXT NOT NULL DEFAULT '[]'"),
    ("round", "failure", "TEXT NOT NULL DEFAULT ''"),
    ("run", "failure", "TEXT NOT NULL DEFAULT ''"),
    ("worker", "left_reason", "TEXT NOT NULL DEFAULT ''"),
    ("worker", "rank", "INTEGER NOT NULL DEFAULT 0"),
    ("worker", "base_precision", "TEXT NOT NULL DEFAULT ''"),
)


def wal_of(path: Path) -> Path:
    """The write-ahead log SQLite keeps beside the database at `path`."""
    return path.with_name(f"{path.name}-wal")


class SqliteStore(CoordinatorStore):
    def __init__(self, path: Path) -> None:
        """Open (or create) the store; StateError, before anything is written, if its files are not sound.

        The database and its write-ahead log are judged from a read-only `snapshot` first: SQLite
        would drop a damaged log's frames on opening and truncate it, and a schema is never written
        beside a log whose database is gone.
        """
        log = wal_of(path)
        if path.exists():
            self.snapshot(path).close()
        elif log.exists():
            raise StateError(f"{log}: a write-ahead log without its database {path.name}; restore {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # An operator's command (amend, stop, retry) writes to the database a running coordinator holds: each
        # waits its turn for the other's transaction instead of failing at once.
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self._attach(path, db, setup=("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL"))

    @classmethod
    def snapshot(cls, path: Path) -> SqliteStore:
        """What the database at `path` holds for a reader now, copied into memory; nothing on disk is written.

        Its log is applied as SQLite would apply it (fedlora_server.store.wal), after refusing one
        damaged anywhere but at its tail. Writes to a snapshot stay in memory. StateError if unsound.
        """
        log_path = wal_of(path)
        try:
            log = read_wal(log_path.read_bytes()) if log_path.exists() else WalLog()
        except WalDamage as exc:
            raise StateError(f"{log_path}: {exc}; restore the state directory from a backup") from None
        image = bytearray(committed_image(path.read_bytes(), log))
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        if image:
            image[18:20] = b"\x01\x01"  # the copy in memory keeps no log of its own
            try:
                db.deserialize(bytes(image))
            except sqlite3.DatabaseError as exc:
                db.close()
                raise StateError(f"{path}: not a sound SQLite database ({exc})") from None
        store = cls.__new__(cls)
        store._attach(path, db, setup=())
        return store

    def _attach(self, path: Path, db: sqlite3.Connection, *, setup: tuple[str, ...]) -> None:
        """Take `db` as this store's connection once it passes a quick check, with this version's schema."""
        self._path = path
        self._lock = threading.Lock()
        self._db = db
        try:
            for pragma in setup:
                db.execute(pragma)
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
            db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.OperationalError as exc:  # the disk or the file refused, not the contents
            db.close()
            raise StateError(f"{path}: cannot be opened ({exc})") from None
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StateError(f"{path}: not a sound SQLite database ({exc})") from None

    def _migrate(self) -> None:
        """Add the columns later versions introduced to a store an earlier version wrote."""
        for table, column, definition in MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._faults():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):  # the error that got here is the one to report
                        self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock, self._faults():
            return list(self._db.execute(sql, args).fetchall())

    @contextmanager
    def _faults(self) -> Iterator[None]:
        """A disk or database fault (full, read-only, I/O error) is the coordinator's own: Unavailable."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as exc:
            raise Unavailable(f"the coordinator's database {self._path} failed: {exc}") from exc

    def load_run(self) -> RunRecord | None:
        rows = self._query("SELECT run_id, config_json, created_at, failure FROM run")
        return RunRecord(*rows[0]) if rows else None  # type: ignore[arg-type]

    def create_run(self, run: RunRecord) -> None:
        with self._tx() as db:
            rows = db.execute("SELECT run_id FROM run").fetchall()
            if rows and rows[0][0] != run.run_id:
                raise StoreError(f"store holds run {rows[0][0]}, not {run.run_id}")
            if not rows:
                db.execute(
                    "INSERT INTO run (run_id, config_json, created_at, failure) VALUES (?, ?, ?, ?)",
                    (run.run_id, run.config_json, run.created_at, run.failure),
                )

    def fail_run(self, reason: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE run SET failure = ?", (reason,))

    def amend_run(self, config_json: str, event: RunEvent) -> None:
        with self._tx() as db:
            if db.execute("UPDATE run SET config_json = ?", (config_json,)).rowcount != 1:
                raise StoreError("no run to amend")
            self._insert_event(db, event)

    def reopen_run(self, event: RunEvent) -> None:
        with self._tx() as db:
            if db.execute("UPDATE run SET failure = ''").rowcount != 1:
                raise StoreError("no run to retry")
            self._insert_event(db, event)

    def record_event(self, event: RunEvent) -> None:
        with self._tx() as db:
            self._insert_event(db, event)

    @staticmethod
    def _insert_event(db: sqlite3.Connection, event: RunEvent) -> None:
        db.execute("INSERT INTO event (at, kind, detail) VALUES (?, ?, ?)", (event.at, event.kind, event.detail))

    def events(self) -> list[RunEvent]:
        rows = self._query("SELECT at, kind, detail FROM event ORDER BY seq")
        return [RunEvent(*row) for row in rows]  # type: ignore[arg-type]

    def upsert_worker(self, worker: WorkerRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO worker (worker_id, num_examples, joined_at, left_reason, rank, base_precision) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(worker_id) DO UPDATE SET num_examples = excluded.num_examples, "
                "left_reason = excluded.left_reason, rank = excluded.rank, base_precision = excluded.base_precision",
                (
                    worker.worker_id,
                    worker.num_examples,
                    worker.joined_at,
                    worker.left_reason,
                    worker.rank,
                    worker.base_precision,
                ),
            )

    def workers(self) -> list[WorkerRecord]:
        rows = self._query(
            "SELECT worker_id, num_examples, joined_at, left_reason, rank, base_precision FROM worker ORDER BY worker_id"
        )
        return [WorkerRecord(*row) for row in rows]  # type: ignore[arg-type]

    def save_round(self, record: RoundRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO round (round, attempt, status, participants, started_at, deadline_at, "
                "finished_at, dropped, train_loss, eval_loss, upload_bytes, download_bytes, secagg, excluded, failure) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.round,
                    record.attempt,
                    record.status,
                    json.dumps(list(record.participants)),
                    record.started_at,
                    record.deadline_at,
                    record.finished_at,
                    json.dumps(list(record.dropped)),
                    record.train_loss,
                    record.eval_loss,
                    record.upload_bytes,
                    record.download_bytes,
                    record.secagg,
                    json.dumps(list(record.excluded)),
                    record.failure,
                ),
            )

    def rounds(self) -> list[RoundRecord]:
        rows = self._query(
            "SELECT round, attempt, status, participants, started_at, deadline_at, finished_at, dropped, train_loss, "
            "eval_loss, upload_bytes, download_bytes, secagg, excluded, failure FROM round ORDER BY round, attempt"
        )
        return [
            RoundRecord(
                round=r[0],  # type: ignore[arg-type]
                attempt=r[1],  # type: ignore[arg-type]
                status=r[2],  # type: ignore[arg-type]
                participants=tuple(json.loads(r[3])),  # type: ignore[arg-type]
                started_at=r[4],  # type: ignore[arg-type]
                deadline_at=r[5],  # type: ignore[arg-type]
                finished_at=r[6],  # type: ignore[arg-type]
                dropped=tuple(json.loads(r[7])),  # type: ignore[arg-type]
                train_loss=r[8],  # type: ignore[arg-type]
                eval_loss=r[9],  # type: ignore[arg-type]
                upload_bytes=r[10],  # type: ignore[arg-type]
                download_bytes=r[11],  # type: ignore[arg-type]
                secagg=r[12],  # type: ignore[arg-type]
                excluded=tuple(json.loads(r[13])),  # type: ignore[arg-type]
                failure=r[14],  # type: ignore[arg-type]
            )
            for r in rows
        ]

    def record_upload(self, upload: UploadRecord) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO upload VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        upload.round,
                        upload.attempt,
                        upload.worker_id,
                        upload.num_examples,
                        upload.size_bytes,
                        upload.sha256,
                        upload.train_loss,
                    ),
                )
        except sqlite3.IntegrityError:
            raise DuplicateUploadError(f"{upload.worker_id} already uploaded round {upload.round}") from None

    def uploads(self, round_: int, attempt: int) -> list[UploadRecord]:
        rows = self._query("SELECT * FROM upload WHERE round = ? AND attempt = ? ORDER BY worker_id", (round_, attempt))
        return [UploadRecord(*row) for row in rows]  # type: ignore[arg-type]

    def commit_artifact(self, artifact: ArtifactRecord) -> None:
        with self._tx() as db:
            row = db.execute("SELECT sha256 FROM artifact WHERE version = ?", (artifact.version,)).fetchone()
            if row is not None and row[0] == artifact.sha256:
                return  # the same version committed again: a retried commit
            (latest,) = db.execute("SELECT MAX(version) FROM artifact").fetchone()
            if latest is not None and artifact.version <= latest:
                raise StoreError(f"version {artifact.version} is not newer than {latest}")
            db.execute(
                "INSERT INTO artifact VALUES (?, ?, ?, ?, ?, ?)",
                (
                    artifact.version,
                    artifact.round,
                    artifact.sha256,
                    artifact.size_bytes,
                    artifact.path,
                    artifact.committed_at,
                ),
            )

    def artifacts(self) -> list[ArtifactRecord]:
        rows = self._query("SELECT * FROM artifact ORDER BY version")
        return [ArtifactRecord(*row) for row in rows]  # type: ignore[arg-type]

    def record_metrics(self, metrics: MetricsRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    metrics.round,
                    metrics.worker_id,
                    metrics.version,
                    metrics.eval_loss,
                    metrics.eval_tokens,
                    metrics.train_loss,
                    metrics.tokens_per_second,
                    metrics.record_epsilon,
                    metrics.memorization_json,
                ),
            )

    def metrics(self, round_: int) -> list[MetricsRecord]:
        rows = self._query("SELECT * FROM metrics WHERE round = ? ORDER BY worker_id", (round_,))
        return [MetricsRecord(*row) for row in rows]  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            self._db.close()
