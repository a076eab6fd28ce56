"""State directories as runs leave them, and what a start on one does to its files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from fedlora_common.messages import UploadKind
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import SqliteStore
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


def commit_round_one(state_dir: Path, store: SqliteStore, **overrides: object) -> np.ndarray:
    """Drive a run on `store` until version 1 (round 1) is committed and evaluated; that version's vector."""
    settings = run_settings(state_dir, **overrides)
    coordinator = Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock())
    initialized(coordinator)
    for w in WORKERS:
        delta = np.full(MANIFEST.numel, 0.5, dtype=np.float32)
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    for w in WORKERS:
        coordinator.report_metrics(eval_report(w, 1, 2.0))
    return coordinator.global_model("legal", 1).vector


def one_round_committed(state_dir: Path, **overrides: object) -> np.ndarray:
    """A run that committed version 1 (round 1), its coordinator shut down; returns that version's vector."""
    store = SqliteStore(state_dir / "coordinator.db")
    try:
        return commit_round_one(state_dir, store, **overrides)
    finally:
        store.close()


def left_by_kill_9(state_dir: Path) -> np.ndarray:
    """The same run, its coordinator killed: every transaction still sits in the database's write-ahead log."""
    live = state_dir.with_name("live")
    store = SqliteStore(live / "coordinator.db")
    committed = commit_round_one(live, store)
    shutil.copytree(live, state_dir, symlinks=True)  # SQLite's files as a SIGKILL leaves them
    store.close()
    assert (state_dir / "coordinator.db-wal").stat().st_size > 16 * 4096
    return committed


def files_of(state_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under state_dir (links as their target): its bytes and its modification time."""
    found = {}
    for path in sorted(state_dir.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(state_dir))] = (os.readlink(path).encode(), path.lstat().st_mtime_ns)
        elif path.is_file():
            found[str(path.relative_to(state_dir))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def start_refused(state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`fedlora-server --config [flags]` on state_dir, for a start expected to be refused (it would run on otherwise)."""
    config = state_dir.parent / "run.json"
    config.write_text(run_settings(state_dir).model_dump_json())
    command = [sys.executable, "-m", "fedlora_server", "--config", str(config), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
