"""Whether the coordinator may start on a state directory, judged before it writes anything there.

Every check reads (the database through a read-only snapshot of it and its write-ahead log),
except the last, which proves each directory writable by writing, fsyncing and removing a file:
permission bits say nothing to root, while a read-only mount, an immutable directory or a full
disk do. A refused start therefore creates, truncates or deletes no file; it raises StateError,
whose message is one line naming the file and the fault (settings that differ from those the run is pinned to:
one more line per field).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fedlora_server.config import RunSettings
from fedlora_server.pinning import changes, pinned
from fedlora_server.store import ArtifactRecord, RunRecord, SqliteStore, StateError
from fedlora_server.store.sqlite import wal_of
from fedlora_server.versions import ARTIFACTS_DIR, verified_artifact, versions_on_disk

__all__ = ["DATABASE", "SPOOL", "check_state_dir", "versions_without_run"]

DATABASE = "coordinator.db"
SPOOL = "spool"
PROBE = b"fedlora write probe\n"
VERSION_NAME = re.compile(r"v(\d+)")


def check_state_dir(settings: RunSettings) -> None:
    """StateError unless the coordinator can resume (or start) the run `settings` describe on its state_dir, with
    the settings the run was pinned to, and write there."""
    state_dir, run_id = settings.state_dir, settings.run_id
    run, records = _recorded(state_dir / DATABASE)
    on_disk = versions_on_disk(state_dir)
    if run is None and on_disk:
        raise versions_without_run(on_disk)
    if run is not None and run.run_id != run_id:
        raise StateError(
            f"the state directory holds run {run.run_id!r}, not {run_id!r}: point state_dir elsewhere for a new run"
        )
    if run is not None and (changed := changes(pinned(json.loads(run.config_json)), pinned(settings))):
        raise StateError(
            f"{state_dir}: the run's settings differ from those it was started with; change them on purpose with "
            "`fedlora-server amend` (what may change), or start a new run elsewhere:\n"
            + "\n".join(f"  {c.line()}" for c in changed)
        )
    _check_versions(state_dir, records, on_disk)
    _probe_writable(state_dir)
    if (state_dir / ARTIFACTS_DIR).exists():
        _probe_writable(state_dir / ARTIFACTS_DIR)
    _probe_writable(state_dir / SPOOL)


def versions_without_run(on_disk: list[Path]) -> StateError:
    """Versions on disk that no run records: the database belongs to another run, or it was lost."""
    return StateError(
        f"{on_disk[0].parent}: holds {len(on_disk)} committed versions but the store records no run; "
        "restore coordinator.db, or move the artifacts away to start a new run"
    )


def _recorded(database: Path) -> tuple[RunRecord | None, list[ArtifactRecord]]:
    """The run and versions the database records, read from a snapshot; none when there is no database."""
    if not database.exists():
        log = wal_of(database)
        if log.exists():
            raise StateError(f"{log}: a write-ahead log without its database {database.name}; restore {database.name}")
        return None, []
    snapshot = SqliteStore.snapshot(database)
    try:
        return snapshot.load_run(), snapshot.artifacts()
    finally:
        snapshot.close()


def _check_versions(state_dir: Path, records: list[ArtifactRecord], on_disk: list[Path]) -> None:
    """A crash leaves at most one version on disk that the store does not record yet; the latest must be whole."""
    recorded = records[-1].version if records else -1
    numbered = [(int(m.group(1)), p) for p in on_disk if (m := VERSION_NAME.fullmatch(p.name))]
    if numbered and (newest := max(numbered))[0] > recorded + 1:
        latest = f"version {recorded}" if records else "no version"
        raise StateError(
            f"{newest[1]}: version {newest[0]} is on disk but the store's latest is {latest}: "
            "the database lost committed rounds; restore coordinator.db from a backup"
        )
    if records:
        verified_artifact(state_dir, records[-1])


def _probe_writable(directory: Path) -> None:
    """Write, fsync and remove a file in `directory` (made if missing); StateError naming it if that fails."""
    if directory.exists() and not directory.is_dir():
        raise StateError(f"{directory}: is not a directory; the coordinator needs to write there")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StateError(f"{directory}: the coordinator cannot write here ({exc.strerror})") from None
    try:
        if os.write(fd, PROBE) != len(PROBE):
            raise StateError(f"{directory}: the coordinator cannot write here (the disk is full)")
        os.fsync(fd)
    except OSError as exc:
        raise StateError(f"{directory}: the coordinator cannot write here ({exc.strerror})") from None
    finally:
        os.close(fd)
        probe.unlink()
