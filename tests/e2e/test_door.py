"""A stranger's flood of half-sent calls against a real run: it must commit on time all the same.

Real `fedlora-server` and `fedlora-worker` processes on the tiny lab model (tests/e2e/processes.py),
one round with secure aggregation. Meanwhile a stranger, with no token, keeps one connection after
another open to the coordinator, each carrying 100 Joins stopped after 10 of the 100,000 bytes they
declare (tests/h2client.py): the flood that once held the coordinator at its concurrent-call limit
while every worker, refused, exited with code 1.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fedlora_lab.model_factory import MadeModel
from fedlora_server.server import SERVICE_NAME
from tests.e2e.processes import COORDINATOR, federation, is_event, tiny_plan
from tests.h2client import RawConnection

UNAUTHENTICATED = "16"


class Flood:
    """Until stopped: a connection, 100 half-sent Joins without a token on it, held open a second, again."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self.waves = 0
        self.answers: dict[str, int] = {}

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with RawConnection(self._port) as raw:
                    calls = [raw.call(f"/{SERVICE_NAME}/Join", body=b"\0" * 10, declared=100_000) for _ in range(100)]
                    ended = raw.statuses(calls, timeout_s=1.0)
                    self._stop.wait(1.0)  # the connection stays open, as the attacker's did
            except OSError:  # the coordinator has finished and gone
                return
            if raw.closed:  # the same, during this wave
                return
            self.waves += 1
            for status in [*ended.values(), *["open"] * (len(calls) - len(ended))]:
                self.answers[status] = self.answers.get(status, 0) + 1


@pytest.mark.slow
def test_a_run_flooded_with_half_sent_calls_of_strangers_commits_its_round_without_a_failed_attempt(
    lab_model: MadeModel, tmp_path: Path
) -> None:
    # Prepare: one round; the coordinator up, and the flood on, before any worker starts.
    with federation(tiny_plan(tmp_path / "flooded", lab_model.path, rounds=1)) as fed:
        fed.start_coordinator()
        port = int(fed.wait_for(COORDINATOR, is_event("coordinator_listening"))["port"])
        with Flood(port) as flood:
            # Execute
            for worker in fed.workers:
                fed.start_worker(worker)
            codes = fed.wait_exit(300)
        report = json.loads((fed.out / "report.json").read_text())
    print(f"{flood.waves} waves of 100 half-sent Joins; how they ended: {flood.answers}")

    # Assert: every worker finished, the round committed on its first attempt, and the flood was turned away.
    assert set(codes.values()) == {0}, codes
    assert report["failure"] is None
    assert [r["round"] for r in report["rounds"]] == [1]
    assert report["attempt_failures"] == []
    assert flood.waves >= 1
    assert flood.answers.get(UNAUTHENTICATED, 0) > 0
    assert "open" not in flood.answers, flood.answers
