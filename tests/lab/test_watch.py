"""The demo's live line: where a running federation's state says it stands, each time that changes."""

from __future__ import annotations

import threading
from pathlib import Path

from fedlora_lab.watch import watching
from fedlora_server.store import SqliteStore
from tests.server.statedir import one_round_committed


def _until(condition: threading.Event, what: str) -> None:
    assert condition.wait(60), f"waited 60 s for {what}"


def test_a_line_each_time_the_round_phase_or_loss_changes_and_none_in_between(tmp_path: Path) -> None:
    # Prepare: a run that committed and evaluated round 1 of 2, and has round 2 training.
    state = tmp_path / "state"
    one_round_committed(state)
    lines: list[str] = []
    seen = [threading.Event(), threading.Event()]

    def say(line: str) -> None:
        lines.append(line)
        if len(lines) <= len(seen):
            seen[len(lines) - 1].set()

    # Execute: watch, and fail the run while watched.
    with watching(state, rounds=2, say=say, every_s=0.05):
        _until(seen[0], "the first line")
        store = SqliteStore(state / "coordinator.db")
        store.fail_run("the disk broke")
        store.close()
        _until(seen[1], "the line of the failed run")

    # Assert: the training round, then the failure; each once.
    assert lines == [
        "round 2 of 2, attempt 1: training (3 sites, held-out loss 2.000)",
        "failed at round 2 of 2: the disk broke (3 sites, held-out loss 2.000)",
    ]
