"""A backup put back into a state directory the coordinator resumes from.

The whole archive is checked against its manifest (`fedlora-backup.json`: every file's size and
sha256, the `adapter` link, the run and its versions) before anything is written. It is then written
into a directory beside the target, checked again (what the database records is what the manifest
names, and the latest version is whole) and renamed into place: the target holds the whole state or
nothing. A restore never writes into a directory that holds anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from fedlora_common.settings import describe
from fedlora_server.backup import (
    ARCHIVE_FILE,
    MANIFEST_NAME,
    BackupError,
    BackupManifest,
    FileEntry,
    VersionEntry,
    fsync_dir,
)
from fedlora_server.state_check import DATABASE
from fedlora_server.store import SqliteStore, StateError
from fedlora_server.versions import ADAPTER_LINK, ARTIFACTS_DIR, verified_artifact

__all__ = ["RestoreResult", "read_backup", "restore_backup"]

MANIFEST_LIMIT = 64 * 2**20
BLOCK = 2**20
VERSION_DIR = re.compile(rf"{ARTIFACTS_DIR}/v\d{{6,}}")


@dataclass(frozen=True)
class RestoreResult:
    state_dir: Path
    manifest: BackupManifest
    size_bytes: int
    """Bytes of the files restored."""


@dataclass
class _Contents:
    files: dict[str, FileEntry]
    link: str | None
    manifest: bytes | None


def _walk(archive: Path, write_to: Path | None) -> _Contents:
    """Read every member of the archive, hashing its files; with `write_to`, also write them there.

    Only the names a backup holds are accepted (no absolute path, no '..', no link but `adapter`).
    """
    contents = _Contents({}, None, None)
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar:
            name = member.name
            if name in contents.files or (name == ADAPTER_LINK and contents.link is not None):
                raise BackupError(f"{archive}: holds {name} twice")
            if name == ADAPTER_LINK and member.issym():
                if not VERSION_DIR.fullmatch(member.linkname):
                    raise BackupError(f"{archive}: its {ADAPTER_LINK} link points outside {ARTIFACTS_DIR}/")
                contents.link = member.linkname
                if write_to is not None:
                    (write_to / name).symlink_to(member.linkname)
                continue
            if not member.isfile() or not (name == MANIFEST_NAME or ARCHIVE_FILE.fullmatch(name)):
                raise BackupError(f"{archive}: holds {name!r}, which no FedLoRA backup holds")
            data = tar.extractfile(member)
            assert data is not None  # a regular file
            if name == MANIFEST_NAME:
                if contents.manifest is not None or member.size > MANIFEST_LIMIT:
                    raise BackupError(f"{archive}: holds an unexpected {MANIFEST_NAME}")
                contents.manifest = data.read()
                continue
            contents.files[name] = _copy_member(data, None if write_to is None else write_to / name)
        # tarfile stops at a header it cannot read as if the archive ended there: read the compressed
        # stream to its end, where gzip checks its CRC, so damage anywhere is found.
        assert tar.fileobj is not None
        while tar.fileobj.read(BLOCK):
            pass
    return contents


def _copy_member(data: IO[bytes], target: Path | None) -> FileEntry:
    digest, size = hashlib.sha256(), 0
    out = None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = target.open("xb")
    try:
        while block := data.read(BLOCK):
            digest.update(block)
            size += len(block)
            if out is not None:
                out.write(block)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return FileEntry(size=size, sha256=digest.hexdigest())


def _checked(archive: Path, contents: _Contents) -> BackupManifest:
    """The manifest, once the archive's files, link and versions are exactly what it says."""
    if contents.manifest is None:
        raise BackupError(f"{archive}: not a FedLoRA backup (no {MANIFEST_NAME})")
    try:
        manifest = BackupManifest.model_validate_json(contents.manifest)
    except ValidationError as exc:
        raise BackupError(f"{archive}: {MANIFEST_NAME}: {describe(exc, BackupManifest)}") from None
    if DATABASE not in manifest.files:
        raise BackupError(f"{archive}: its manifest lists no {DATABASE}")
    for name in sorted(manifest.files.keys() | contents.files.keys()):
        listed, found = manifest.files.get(name), contents.files.get(name)
        if found is None:
            raise BackupError(f"{archive}: {name} is missing (damaged or cut short)")
        if listed is None:
            raise BackupError(f"{archive}: holds {name}, which its manifest does not list")
        if found != listed:
            raise BackupError(f"{archive}: {name} does not match its manifest's size and sha256 (damaged)")
    if contents.link != manifest.adapter:
        raise BackupError(f"{archive}: its {ADAPTER_LINK} link is not the one its manifest names")
    held = {name.rsplit("/", 1)[0] for name in contents.files if name.startswith(f"{ARTIFACTS_DIR}/")}
    if manifest.adapter is not None and manifest.adapter not in held:
        raise BackupError(f"{archive}: its {ADAPTER_LINK} link points at a version it does not hold")
    return manifest


def read_backup(archive: Path) -> BackupManifest:
    """The manifest of `archive`, once every member was read and matched it; writes nothing."""
    if not archive.is_file():
        raise BackupError(f"{archive}: no such file")
    try:
        return _checked(archive, _walk(archive, None))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BackupError(f"{archive}: damaged or not a FedLoRA backup ({exc})") from None


def restore_backup(archive: Path, state_dir: Path) -> RestoreResult:
    """Put the backup `archive` into state_dir (absent or empty); BackupError if refused, nothing written then."""
    if state_dir.is_symlink() or (state_dir.exists() and (not state_dir.is_dir() or any(state_dir.iterdir()))):
        raise BackupError(f"{state_dir}: exists and is not empty; a restore never overwrites a state directory")
    manifest = read_backup(archive)
    target = Path(os.path.abspath(state_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore-{os.getpid()}")
    try:
        tmp.mkdir()
        try:
            written = _walk(archive, tmp)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise BackupError(f"{archive}: damaged ({exc})") from None
        if _checked(archive, written) != manifest:
            raise BackupError(f"{archive}: changed while it was restored")
        _check_restored(archive, tmp, manifest)
        for directory in (*(p for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink()), tmp):
            fsync_dir(directory)
        os.replace(tmp, target)  # onto an empty directory, or none
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    fsync_dir(target.parent)
    return RestoreResult(state_dir, manifest, sum(f.size for f in manifest.files.values()))


def _check_restored(archive: Path, state_dir: Path, manifest: BackupManifest) -> None:
    """The restored database records the manifest's run and versions, and the latest of them is whole."""
    try:
        store = SqliteStore.snapshot(state_dir / DATABASE)
        try:
            run, records = store.load_run(), store.artifacts()
        finally:
            store.close()
        recorded = tuple(VersionEntry(version=r.version, round=r.round, sha256=r.sha256) for r in records)
        if run is None or run.run_id != manifest.run_id or recorded != manifest.versions:
            raise BackupError(f"{archive}: its {DATABASE} does not record the run and versions its manifest names")
        if records:
            verified_artifact(state_dir, records[-1])
    except StateError as exc:
        raise BackupError(f"{archive}: holds a state the coordinator cannot resume from ({exc})") from None
