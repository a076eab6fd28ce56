"""`fedlora-server backup` and `restore`: a consistent archive, taken while the store is written, that a
coordinator resumes from; and every refusal in one line, with nothing written."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_server.artifacts import point_latest, write_artifact
from fedlora_server.backup import MANIFEST_NAME, create_backup
from fedlora_server.cli import main
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.restore import read_backup
from fedlora_server.store import ArtifactRecord, RoundRecord, SqliteStore
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, WORKERS, Clock, run_settings
from tests.server.statedir import files_of, left_by_kill_9, one_round_committed


def _resumed_vector(state_dir: Path) -> np.ndarray:
    """Start a coordinator on state_dir as `fedlora-server` would, and read the version it resumed at."""
    store = SqliteStore(state_dir / "coordinator.db")
    coordinator = Coordinator(
        settings=run_settings(state_dir), store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock()
    )
    for w in WORKERS:
        coordinator.join(w, 100)
    vector = coordinator.global_model("legal", 1).vector
    store.close()
    return vector


def _members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """`fedlora-server ARGV` in this process: exit code, stdout and stderr (of this call alone)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_backup_restored_elsewhere_resumes_the_run_at_its_last_committed_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run that committed round 1, and its run.yaml.
    state = tmp_path / "site" / "state"
    committed = one_round_committed(state)
    config = tmp_path / "run.yaml"
    config.write_text(run_settings(state).model_dump_json())
    archive = tmp_path / "backup.tar.gz"

    # Execute
    backed = _run(capsys, "backup", "--config", config, "--out", archive)
    restored = _run(capsys, "restore", "--from", archive, "--state-dir", tmp_path / "elsewhere" / "state")

    # Assert: one line each, naming file, run, versions and bytes; the restored state resumes at version 1.
    assert backed[0] == 0, backed
    assert backed[1].startswith(f"wrote {archive}: run test-run, versions 0-1 (adapter: artifacts/v000001), 7 files, ")
    assert f"{archive.stat().st_size} bytes" in backed[1]
    assert backed[1].count("\n") == 1
    assert restored[0] == 0, restored
    assert restored[1].startswith("restored run test-run, versions 0-1 (7 files, ")
    assert restored[1].count("\n") == 1
    resumed = tmp_path / "elsewhere" / "state"
    assert os.readlink(resumed / "adapter") == "artifacts/v000001"
    np.testing.assert_array_equal(_resumed_vector(resumed), committed)


def test_the_manifest_names_the_run_its_versions_and_every_files_digest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)

    made = create_backup(state, tmp_path / "b.tar.gz", clock=lambda: 1_800_000_000.0)

    manifest = made.manifest
    assert manifest.run_id == "test-run"
    assert manifest.created_at == "2027-01-15T08:00:00+00:00"
    assert manifest.software_version
    assert [(v.version, v.round) for v in manifest.versions] == [(0, 0), (1, 1)]
    assert sorted(manifest.files) == sorted(
        ["coordinator.db"]
        + [f"artifacts/v00000{v}/{f}" for v in (0, 1) for f in ("adapter_config.json", "adapter_model.safetensors")]
        + [f"artifacts/v00000{v}/fedlora.json" for v in (0, 1)]
    )
    assert (
        manifest.files["artifacts/v000001/fedlora.json"].size
        == (state / "artifacts/v000001/fedlora.json").stat().st_size
    )
    assert read_backup(made.path) == manifest
    assert (made.path.stat().st_mode & 0o777) == 0o600  # it holds the run's allow-list


def test_a_backup_taken_while_a_writer_commits_is_one_consistent_snapshot(tmp_path: Path) -> None:
    # Prepare: a thread commits version after version (written, then recorded) and a round row each time,
    # through its own connection to the same database.
    state = tmp_path / "state"
    one_round_committed(state)
    writer = SqliteStore(state / "coordinator.db")
    stop, busy = threading.Event(), threading.Event()
    committed: list[int] = []
    failures: list[BaseException] = []

    def write() -> None:
        version = 2
        try:
            while not stop.is_set():
                vector = np.full(MANIFEST.numel, version, dtype=np.float32)
                artifact = write_artifact(
                    state / "artifacts",
                    version,
                    mode="lora",
                    manifest=MANIFEST,
                    vector=vector,
                    config_json=ADAPTER_CONFIG,
                )
                writer.commit_artifact(
                    ArtifactRecord(
                        version, version, artifact.sha256.hex(), vector.nbytes, f"artifacts/{artifact.path.name}", 0.0
                    )
                )
                writer.save_round(RoundRecord(version, 1, "completed", WORKERS, 0.0, 1.0, finished_at=1.0))
                committed.append(version)
                if len(committed) >= 5:
                    busy.set()
                version += 1
        except BaseException as exc:  # the test fails on it below
            failures.append(exc)
            busy.set()

    thread = threading.Thread(target=write, name="writer")
    thread.start()
    try:
        busy.wait(timeout=60)
        before = len(committed)

        # Execute
        made = create_backup(state, tmp_path / "b.tar.gz")
    finally:
        stop.set()
        thread.join()
        writer.close()

    # Assert: the archive holds exactly the versions its database records: all committed before it began, each whole.
    assert not failures, failures
    versions = [v.version for v in made.manifest.versions]
    assert versions == list(range(len(versions)))
    assert len(versions) >= 2 + before
    held = sorted({name.split("/")[1] for name in _members(made.path) if name.startswith("artifacts/")})
    assert held == [f"v{v:06d}" for v in versions]
    restored = tmp_path / "restored"
    assert main(["restore", "--from", str(made.path), "--state-dir", str(restored)]) == 0  # checks every file
    snapshot = SqliteStore.snapshot(restored / "coordinator.db")
    assert [r.version for r in snapshot.artifacts()] == versions
    assert {r.round for r in snapshot.rounds()} >= set(range(2, 2 + before))
    snapshot.close()


def test_a_version_written_but_not_recorded_is_left_out_and_the_link_follows_the_records(tmp_path: Path) -> None:
    # Prepare: version 2 is on disk and linked, but the store has not recorded it (a commit in progress).
    state = tmp_path / "state"
    one_round_committed(state)
    vector = np.zeros(MANIFEST.numel, dtype=np.float32)
    write_artifact(state / "artifacts", 2, mode="lora", manifest=MANIFEST, vector=vector, config_json=ADAPTER_CONFIG)
    point_latest(state / "adapter", state / "artifacts" / "v000002")

    # Execute
    made = create_backup(state, tmp_path / "b.tar.gz")

    # Assert
    assert [v.version for v in made.manifest.versions] == [0, 1]
    assert made.manifest.adapter == "artifacts/v000001"
    assert not [name for name in _members(made.path) if "v000002" in name]


def test_a_backup_of_a_stopped_coordinator_writes_nothing_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state)
    before = files_of(state)

    create_backup(state, tmp_path / "b.tar.gz")

    assert files_of(state) == before  # no log or shared-memory file either


def test_a_backup_of_what_a_kill_9_left_holds_every_transaction_of_its_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    committed = left_by_kill_9(state)
    before = files_of(state)

    made = create_backup(state, tmp_path / "b.tar.gz")
    restore = main(["restore", "--from", str(made.path), "--state-dir", str(tmp_path / "restored")])

    assert restore == 0
    # Only SQLite's shared-memory index of the log is rebuilt, as by any reader; the log itself is untouched.
    changed = {name for name in before.keys() | files_of(state).keys() if before.get(name) != files_of(state).get(name)}
    assert changed <= {"coordinator.db-shm"}
    assert [v.version for v in made.manifest.versions] == [0, 1]
    np.testing.assert_array_equal(_resumed_vector(tmp_path / "restored"), committed)


# ---- refusals: exit 2, one line, nothing written ------------------------------------------------


def _damage_version_one(state: Path) -> None:
    weights = state / "artifacts" / "v000001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("setup", "argv", "named"),
    [
        (lambda tmp: (tmp / "b.tar.gz").write_text("keep me"), ["--state-dir", "{state}"], "b.tar.gz: already exists"),
        (lambda tmp: None, ["--state-dir", "{tmp}/nowhere"], "nowhere: holds no coordinator.db"),
        (lambda tmp: _damage_version_one(tmp / "state"), ["--state-dir", "{state}"], "v000001: version 1"),
        (lambda tmp: None, ["--config", "{tmp}/other.yaml"], "holds run 'test-run', not 'other-run'"),
        (lambda tmp: None, [], "error: one of the arguments --config --state-dir is required"),
        (lambda tmp: None, ["--state-dir", "{state}", "--config", "{tmp}/other.yaml"], "not allowed with argument"),
        (
            lambda tmp: SqliteStore(tmp / "new" / "coordinator.db").close(),
            ["--state-dir", "{tmp}/new"],
            "records no run",
        ),
        (lambda tmp: None, ["--state-dir", "{state}", "--out", "{tmp}/gone/b.tar.gz"], "gone: no such directory"),
    ],
    ids=[
        "archive exists",
        "no database",
        "damaged version",
        "another run",
        "no state",
        "two states",
        "no run",
        "no such directory",
    ],
)
def test_a_refused_backup_says_why_in_one_line_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Callable[[Path], object],
    argv: list[str],
    named: str,
) -> None:
    # Prepare
    state = tmp_path / "state"
    one_round_committed(state)
    (tmp_path / "other.yaml").write_text(run_settings(state, run_id="other-run").model_dump_json())
    setup(tmp_path)
    before = {**files_of(tmp_path)}

    # Execute
    args = [a.format(state=state, tmp=tmp_path) for a in argv]
    code, out, err = _run(capsys, "backup", "--out", tmp_path / "b.tar.gz", *args)

    # Assert
    assert code == 2
    assert named in err
    assert err.count("\n") == 1, err
    assert out == ""
    assert files_of(tmp_path) == before


def _rewritten(archive: Path, out: Path, change: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]) -> None:
    """`archive` written again as `out` after `change` edited its members (a well-formed gzip and tar)."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]  # type: ignore[union-attr]
    change(members)
    with tarfile.open(out, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _edit(name: str, edit: Callable[[bytes], bytes]) -> Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]:
    def change(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        for i, (info, data) in enumerate(members):
            if info.name == name:
                members[i] = (info, edit(data))

    return change


def _drop(name: str) -> Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]:
    return lambda members: members.remove(next(m for m in members if m[0].name == name))


def _add(name: str) -> Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]:
    return lambda members: members.append((tarfile.TarInfo(name), b"evil"))


def _relink(target: str) -> Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]:
    def change(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        next(info for info, _ in members if info.name == "adapter").linkname = target

    return change


def _forge_run(data: bytes) -> bytes:
    return json.dumps({**json.loads(data), "run_id": "forged"}).encode()


WEIGHTS = "artifacts/v000001/adapter_model.safetensors"
DAMAGES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "missing": (lambda good, bad: None, "bad.tar.gz: no such file"),
    "not gzip": (lambda good, bad: bad.write_text("hello"), "bad.tar.gz: damaged or not a FedLoRA backup"),
    "cut short": (
        lambda good, bad: bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
        "bad.tar.gz: damaged or not a FedLoRA backup",
    ),
    "byte flipped": (
        lambda good, bad: bad.write_bytes(_flip(good.read_bytes(), good.stat().st_size // 2)),
        "bad.tar.gz: damaged or not a FedLoRA backup",
    ),
    "file changed": (
        lambda good, bad: _rewritten(good, bad, _edit(WEIGHTS, lambda d: _flip(d, len(d) - 8))),
        f"bad.tar.gz: {WEIGHTS} does not match its manifest's size and sha256",
    ),
    "file missing": (lambda good, bad: _rewritten(good, bad, _drop(WEIGHTS)), f"{WEIGHTS} is missing"),
    "no manifest": (lambda good, bad: _rewritten(good, bad, _drop(MANIFEST_NAME)), "not a FedLoRA backup"),
    "unlisted file": (
        lambda good, bad: _rewritten(good, bad, _add("artifacts/v000001/extra.bin")),
        "holds artifacts/v000001/extra.bin, which its manifest does not list",
    ),
    "path outside": (lambda good, bad: _rewritten(good, bad, _add("../escape")), "holds '../escape', which no"),
    "link outside": (lambda good, bad: _rewritten(good, bad, _relink("/etc")), "its adapter link points outside"),
    "manifest of another run": (
        lambda good, bad: _rewritten(good, bad, _edit(MANIFEST_NAME, _forge_run)),
        "its coordinator.db does not record the run and versions its manifest names",
    ),
}


def _flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_archive_is_refused_naming_it_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    # Prepare: a good backup, then a damaged copy of it.
    one_round_committed(tmp_path / "state")
    good = create_backup(tmp_path / "state", tmp_path / "good.tar.gz").path
    bad = tmp_path / "bad.tar.gz"
    make, named = DAMAGES[damage]
    make(good, bad)
    target = tmp_path / "restored"
    before = sorted(p.name for p in tmp_path.iterdir())

    # Execute
    code, out, err = _run(capsys, "restore", "--from", bad, "--state-dir", target)

    # Assert
    assert code == 2
    assert named in err
    assert err.count("\n") == 1, err
    assert out == ""
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no directory half-restored beside it


@pytest.mark.parametrize("occupied", ["a file in it", "a file"])
def test_a_restore_never_writes_into_a_directory_that_holds_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], occupied: str
) -> None:
    one_round_committed(tmp_path / "state")
    archive = create_backup(tmp_path / "state", tmp_path / "b.tar.gz").path
    target = tmp_path / "target"
    if occupied == "a file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    before = files_of(tmp_path)

    code, _, err = _run(capsys, "restore", "--from", archive, "--state-dir", target)

    assert code == 2
    assert (
        err
        == f"fedlora-server restore: {target}: exists and is not empty; a restore never overwrites a state directory\n"
    )
    assert files_of(tmp_path) == before


def test_a_restore_into_an_empty_directory_fills_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    committed = one_round_committed(tmp_path / "state")
    archive = create_backup(tmp_path / "state", tmp_path / "b.tar.gz").path
    (tmp_path / "mounted").mkdir()  # a fresh volume, say

    code, _, err = _run(capsys, "restore", "--from", archive, "--state-dir", tmp_path / "mounted")

    assert code == 0, err
    np.testing.assert_array_equal(_resumed_vector(tmp_path / "mounted"), committed)
