"""A state directory in one archive: a consistent backup, taken while the coordinator runs or not.

The database is copied with SQLite's online backup API, which reads one transaction's view even while
the coordinator writes (its write-ahead log included). The archive then holds exactly the versions that
copy records, each checked against its recorded digest as it is archived, with the server optimizer's
state after each of them where the run keeps one (`optimizer/vNNNNNN.npz`), and an `adapter` link to the
latest of round >= 1: a version committed meanwhile is not recorded in the copy, so it is not in the
backup either. The state directory is only read (SQLite may rebuild the shared-memory index,
`coordinator.db-shm`, of a log a killed coordinator left, as any reader does). `fedlora-backup.json`,
the archive's last member, names the run and its versions and gives every file's size and sha256
(`restore` checks an archive against it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sqlite3
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import IO, Literal

from pydantic import Field

from fedlora_common.compatibility import software_version
from fedlora_common.settings import StrictModel
from fedlora_server.state_check import DATABASE
from fedlora_server.store import ArtifactRecord, RunRecord, SqliteStore
from fedlora_server.store.sqlite import wal_of
from fedlora_server.strategy_state import STATE_DIR, state_path
from fedlora_server.versions import ADAPTER_LINK, ARTIFACTS_DIR, artifact_path, verified_artifact

__all__ = [
    "ARCHIVE_FILE",
    "MANIFEST_NAME",
    "BackupError",
    "BackupManifest",
    "BackupResult",
    "FileEntry",
    "VersionEntry",
    "copy_database",
    "create_backup",
    "fsync_dir",
    "latest_trained",
    "snapshot_of",
    "versions_text",
]

MANIFEST_NAME = "fedlora-backup.json"
ARCHIVE_FILE = re.compile(
    rf"{re.escape(DATABASE)}|{ARTIFACTS_DIR}/v\d{{6,}}/[A-Za-z0-9][A-Za-z0-9._-]*|{STATE_DIR}/v\d{{6,}}\.npz"
)


class BackupError(Exception):
    """A backup or restore refused; the message is one line naming the file and the fault."""


class FileEntry(StrictModel):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class VersionEntry(StrictModel):
    version: int = Field(ge=0)
    round: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The digest the store recorded for the version")


class BackupManifest(StrictModel):
    """What a backup holds: the run, its committed versions, the `adapter` link, and every file's digest."""

    format: Literal["fedlora-backup"] = "fedlora-backup"
    format_version: Literal[1] = 1
    run_id: str
    created_at: str = Field(description="When the database was copied, ISO 8601 in UTC")
    software_version: str
    versions: tuple[VersionEntry, ...]
    adapter: str | None = Field(description="Target of the `adapter` link, relative to the state directory")
    files: dict[str, FileEntry]


@dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest: BackupManifest
    size_bytes: int


def copy_database(database: Path, into: Path) -> None:
    """Copy the SQLite database at `database` to the new file `into`: one consistent snapshot, read-only.

    With a write-ahead log beside it (a coordinator has it open, or was killed) SQLite's online backup
    reads one transaction's view of database and log. Without one the file alone is whole; it is read
    as immutable, so SQLite creates no log or shared-memory file in the state directory, and read again
    the ordinary way if it changed meanwhile (a coordinator started).
    """
    quiet = not wal_of(database).exists()
    before = _stamp(database)
    _backup(database, into, immutable=quiet)
    if quiet and (wal_of(database).exists() or _stamp(database) != before):
        into.unlink()
        _backup(database, into, immutable=False)


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _backup(database: Path, into: Path, *, immutable: bool) -> None:
    uri = f"{database.resolve().as_uri()}?mode=ro{'&immutable=1' if immutable else ''}"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as source, closing(sqlite3.connect(into)) as copy:
            source.backup(copy)
    except sqlite3.Error as exc:
        raise BackupError(f"{database}: cannot be copied ({exc})") from None


@contextmanager
def snapshot_of(state_dir: Path) -> Iterator[tuple[SqliteStore, Path]]:
    """A consistent, read-only view of the store in state_dir, and the copy of the database it reads."""
    database = state_dir / DATABASE
    if not database.is_file():
        raise BackupError(f"{state_dir}: holds no {DATABASE}; is it the coordinator's state_dir?")
    with TemporaryDirectory(prefix="fedlora-snapshot-") as scratch:
        copy = Path(scratch) / DATABASE
        copy_database(database, copy)
        store = SqliteStore.snapshot(copy)
        try:
            yield store, copy
        finally:
            store.close()


def _recorded_run(store: SqliteStore, state_dir: Path, expect_run: str | None) -> RunRecord:
    run = store.load_run()
    if run is None:
        raise BackupError(f"{state_dir / DATABASE}: records no run")
    if expect_run is not None and run.run_id != expect_run:
        raise BackupError(f"{state_dir}: holds run {run.run_id!r}, not {expect_run!r}")
    return run


def latest_trained(records: list[ArtifactRecord]) -> ArtifactRecord | None:
    """The version `adapter` points at: the latest of round >= 1 (version 0 holds no training)."""
    trained = [r for r in records if r.round >= 1]
    return trained[-1] if trained else None


def create_backup(
    state_dir: Path, out: Path, *, expect_run: str | None = None, clock: Callable[[], float] = time.time
) -> BackupResult:
    """Write the backup of state_dir to `out` (a new .tar.gz); BackupError or StateError if refused."""
    if out.exists() or out.is_symlink():
        raise BackupError(f"{out}: already exists; a backup never overwrites a file")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent}: no such directory")
    with snapshot_of(state_dir) as (store, copy):
        created_at = datetime.fromtimestamp(clock(), UTC).isoformat(timespec="seconds")
        run = _recorded_run(store, state_dir, expect_run)
        records = store.artifacts()
        linked = latest_trained(records)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with _new_file(tmp) as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
                files = {DATABASE: _add_file(tar, DATABASE, copy)}
                for record in records:
                    verified_artifact(state_dir, record)  # the version is whole, with the digest the store recorded
                    source = artifact_path(state_dir, record.path)
                    for path in sorted(source.iterdir()):
                        name = f"{ARTIFACTS_DIR}/{source.name}/{path.name}"
                        if path.is_file() and not path.is_symlink() and ARCHIVE_FILE.fullmatch(name):
                            files[name] = _add_file(tar, name, path)
                    state = state_path(state_dir, record.version)
                    if state.is_file() and not state.is_symlink():
                        name = f"{STATE_DIR}/{state.name}"
                        files[name] = _add_file(tar, name, state)
                adapter = None if linked is None else f"{ARTIFACTS_DIR}/{artifact_path(state_dir, linked.path).name}"
                if adapter is not None:
                    link = tarfile.TarInfo(ADAPTER_LINK)
                    link.type, link.linkname, link.mtime = tarfile.SYMTYPE, adapter, int(clock())
                    tar.addfile(link)
                manifest = BackupManifest(
                    run_id=run.run_id,
                    created_at=created_at,
                    software_version=software_version(),
                    versions=tuple(VersionEntry(version=r.version, round=r.round, sha256=r.sha256) for r in records),
                    adapter=adapter,
                    files=files,
                )
                body = manifest.model_dump_json(indent=1).encode()
                info = tarfile.TarInfo(MANIFEST_NAME)
                info.size, info.mtime, info.mode = len(body), int(clock()), 0o644
                tar.addfile(info, io.BytesIO(body))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(out.parent)
    return BackupResult(out, manifest, out.stat().st_size)


@contextmanager
def _new_file(path: Path) -> Iterator[IO[bytes]]:
    """A file made for this writer alone (0600: it holds the run's allow-list), fsynced when closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


class _Hashing(io.RawIOBase):
    """A reader that hashes what passes through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> FileEntry:
    with path.open("rb") as f:
        stat = os.fstat(f.fileno())
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        reader = _Hashing(f)
        tar.addfile(info, reader)
    if reader.size != stat.st_size:
        raise BackupError(f"{path}: changed while it was archived")
    return FileEntry(size=reader.size, sha256=reader.digest.hexdigest())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions_text(manifest: BackupManifest) -> str:
    """How the versions read in one line of output: versions 0-4, version 0, or no version yet."""
    numbers = [v.version for v in manifest.versions]
    if not numbers:
        return "no version yet"
    return f"version {numbers[0]}" if len(numbers) == 1 else f"versions {numbers[0]}-{numbers[-1]}"
