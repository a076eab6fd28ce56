"""State that is checked and movable: every inconsistency stops the coordinator with one line, never a new run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from fedlora_common.messages import TaskKind, UploadKind
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import SqliteStore, StateError
from tests.server.conftest import (
    MANIFEST,
    WORKERS,
    Clock,
    eval_report,
    initialized,
    run_settings,
    upload_header,
    vector_chunks,
)


def _coordinator(state_dir: Path, **overrides: object) -> Coordinator:
    settings = run_settings(state_dir, **overrides)
    store = SqliteStore(state_dir / "coordinator.db")
    try:
        return Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock())
    except StateError:
        store.close()
        raise


def _one_round_committed(state_dir: Path) -> np.ndarray:
    """A run that committed version 1 (round 1); returns that version's vector."""
    store = SqliteStore(state_dir / "coordinator.db")
    settings = run_settings(state_dir)
    coordinator = Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock())
    initialized(coordinator)
    for w in WORKERS:
        delta = np.full(MANIFEST.numel, 0.5, dtype=np.float32)
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    for w in WORKERS:
        coordinator.report_metrics(eval_report(w, 1, 2.0))
    committed = coordinator.global_model("legal", 1).vector
    store.close()
    return committed


def _cli_state_error(state_dir: Path) -> subprocess.CompletedProcess[str]:
    config = state_dir.parent / "run.json"
    config.write_text(run_settings(state_dir).model_dump_json())
    command = [sys.executable, "-m", "fedlora_server", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_an_emptied_database_beside_artifacts_stops_with_one_line_naming_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _one_round_committed(state)
    (state / "coordinator.db").write_bytes(b"")
    for leftover in state.glob("coordinator.db-*"):
        leftover.unlink()

    with pytest.raises(StateError, match="artifacts: holds 2 committed versions but the store records no run"):
        _coordinator(state)
    finished = _cli_state_error(state)

    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1
    assert "artifacts" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_truncated_database_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _one_round_committed(state)
    db = state / "coordinator.db"
    for leftover in state.glob("coordinator.db-*"):
        leftover.unlink()
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])

    finished = _cli_state_error(state)

    assert finished.returncode == 2
    assert "coordinator.db" in finished.stderr
    assert finished.stderr.count("\n") == 1


def test_a_corrupt_artifact_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _one_round_committed(state)
    weights = state / "artifacts" / "v000001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))

    with pytest.raises(StateError, match="v000001: version 1"):
        _coordinator(state)
    finished = _cli_state_error(state)

    assert finished.returncode == 2
    assert "v000001" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_state_directory_moved_elsewhere_resumes_from_its_new_place(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "state", tmp_path / "new" / "state"
    committed = _one_round_committed(old)
    shutil.move(old, new)

    resumed = _coordinator(new)
    for w in WORKERS:
        resumed.join(w, 100)

    np.testing.assert_array_equal(resumed.global_model("legal", 1).vector, committed)
    assert (new / "adapter").resolve() == (new / "artifacts" / "v000001").resolve()


def test_a_state_directory_of_another_run_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _one_round_committed(state)

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
