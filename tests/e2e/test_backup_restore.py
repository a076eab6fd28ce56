"""A backup taken mid-run, restored on another machine, finishes the run with the uninterrupted run's adapter.

Real `fedlora-server` and `fedlora-worker` processes (tests/e2e/processes.py), secure aggregation on, fixed
seeds: the federation of the crash matrix's reference run (conftest.py), which runs meanwhile. Round 1
commits; while round 2 trains, `fedlora-server backup` archives the live coordinator's state. Then its
machine is lost (SIGKILL), the backup is restored into another directory, and a coordinator started on that
directory is found again by the same workers. The final adapter must be bit-identical to the reference's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora_lab.model_factory import MadeModel
from tests.e2e.conftest import ReferenceRun
from tests.e2e.processes import COORDINATOR, federation, is_event, tiny_plan


def _server(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """`fedlora-server ARGV` as an operator runs it."""
    command = [sys.executable, "-m", "fedlora_server", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _adapter(adapter: Path) -> tuple[str, bytes]:
    return json.loads((adapter / "fedlora.json").read_text())["sha256"], (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_a_backup_taken_while_round_two_trains_restored_elsewhere_finishes_with_the_uninterrupted_adapter(
    lab_model: MadeModel, reference_run: ReferenceRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, restored = tmp_path / "crash.tar.gz", tmp_path / "elsewhere" / "state"
    with federation(tiny_plan(tmp_path / "lost", lab_model.path)) as fed:
        # Prepare: round 1 committed, round 2 under way; what the workers send is held from here on, so that
        # round 2 cannot commit before the machine is lost (the backup must not see it either way).
        fed.start_all()
        fed.wait_for(COORDINATOR, is_event("round_started", round=2), timeout_s=300)
        for link in fed.links.values():
            link.stall("up", 600)

        # Execute: back up the live coordinator; lose its machine; restore elsewhere; resume there
        # (FEDLORA_STATE_DIR is `--state_dir DIR`: the harness starts the coordinator with --config alone).
        started = time.monotonic()
        backup = _server("backup", "--config", fed.run_yaml, "--out", archive)
        seconds = time.monotonic() - started
        fed.kill(COORDINATOR)
        for link in fed.links.values():
            link.clear()
        restore = _server("restore", "--from", archive, "--state-dir", restored)
        with monkeypatch.context() as env:
            env.setenv("FEDLORA_STATE_DIR", str(restored))
            fed.start_coordinator()
        codes = fed.wait_exit(300)
        report = json.loads((restored / "report.json").read_text())
        lost_versions = sorted(p.name for p in (fed.out / "artifacts").iterdir())
    reference_codes = reference_run.finished()
    print(f"backup of the live coordinator: {seconds:.1f} s, {archive.stat().st_size} bytes; {backup.stdout.strip()}")

    # Assert: the backup held round 1 and nothing later; the resumed run redid round 2 and finished it as the
    # uninterrupted run did, bit for bit.
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout.startswith(f"wrote {archive}: run crash, versions 0-1 (adapter: artifacts/v000001), ")
    assert restore.returncode == 0, restore.stderr
    assert set(codes.values()) == {0}, codes
    assert set(reference_codes.values()) == {0}, reference_codes
    assert lost_versions == ["v000000", "v000001"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert os.readlink(restored / "adapter") == "artifacts/v000002"
    assert _adapter(restored / "adapter") == _adapter(reference_run.adapter())
