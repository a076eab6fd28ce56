"""A run the operators control, live: amend (more rounds, a site added, a token rotated), stop, status, retry.

Three model-free sites (tests/sites.py) take part through the worker's real transport in a plain run, where
each round commits the examples-weighted mean of the same fixed deltas: what a run commits with an operator's
change is computed exactly, and compared with what it commits without it. A site can be held back before a
task (`gate`), so that a command lands at the moment the test chose.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.messages import Task, TaskKind
from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import SqliteStore
from fedlora_worker.config import TlsClientSettings
from fedlora_worker.tls import make_request
from fedlora_worker.transport import CoordinatorClient
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, Clock, initial_vector, run_settings, token_of
from tests.server.statedir import commit_round_one, one_round_committed
from tests.sites import FAST_RETRY, Model, Site, make_sites, run_sites

MODEL = Model("test-run", MANIFEST, initial_vector(), ADAPTER_CONFIG)
EXAMPLES = {"clinical": 100, "finance": 300, "legal": 600}
DEADLINE_S = 60.0
_TICK = timedelta(milliseconds=50)
_WAIT = timedelta(seconds=DEADLINE_S)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {DEADLINE_S:.0f} s for {what}"
        time.sleep(0.02)


@dataclass
class Gate:
    """Holds every site back before training round `round` until opened; `held` counts the sites it holds."""

    round: int
    opened: threading.Event = field(default_factory=threading.Event)
    held: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, task: Task) -> None:
        if task.kind is TaskKind.TRAIN and task.round >= self.round:
            with self._lock:
                self.held += 1
            assert self.opened.wait(DEADLINE_S), "the gate was never opened"


@dataclass
class Live:
    server: CoordinatorServer
    config: Path
    sites: list[Site]
    errors: dict[str, BaseException] = field(default_factory=dict)

    def committed_round(self) -> int:
        latest = self.server.coordinator._versions.current
        return -1 if latest is None else latest.round

    def operator(self, *args: str) -> int:
        return main([args[0], "--config", str(self.config), *args[1:]])


def _config(tmp_path: Path, settings: RunSettings) -> Path:
    path = tmp_path / "run.json"
    path.write_text(settings.model_dump_json())
    return path


@contextmanager
def live_run(
    tmp_path: Path,
    gate: Gate,
    *,
    examples: dict[str, int] = EXAMPLES,
    tls: dict[str, TlsClientSettings] | None = None,
    **overrides: Any,
) -> Iterator[Live]:
    """A running coordinator and sites taking part in their own threads; joined when the block ends."""
    settings = run_settings(tmp_path / "state", min_workers=len(examples), timeouts={"poll_wait_ms": 20}, **overrides)
    with CoordinatorServer(settings=settings, tick=_TICK) as server:
        sites = make_sites(
            server.port, MODEL, examples, token_of=token_of, chunk_bytes=settings.limits.chunk_bytes, tls=tls
        )
        for site in sites:
            site.before = gate
        live = Live(server, _config(tmp_path, settings), sites)
        runner = threading.Thread(target=lambda: live.errors.update(run_sites(sites)), daemon=True)
        runner.start()
        try:
            yield live
        finally:
            gate.opened.set()
            runner.join(DEADLINE_S)
            server.wait_finished(_WAIT)


def _mean(sites: list[Site], workers: set[str]) -> np.ndarray:
    chosen = [s for s in sites if s.worker in workers]
    return np.average([s.delta for s in chosen], axis=0, weights=[s.examples for s in chosen])


def test_more_rounds_amended_into_a_live_run_commit_what_a_run_planned_with_them_commits(tmp_path: Path) -> None:
    # Prepare: a run of 2 rounds, its sites held before round 2.
    gate = Gate(round=2)
    with live_run(tmp_path, gate, rounds=2) as live:
        _until(lambda: live.committed_round() == 1, "round 1 to commit")
        amended = json.loads(live.config.read_text())
        amended["rounds"] = 3
        live.config.write_text(json.dumps(amended))

        # Execute: amend the file as an operator would, then let the sites go on.
        code = live.operator("amend")
        _until(lambda: live.server.coordinator.settings.rounds == 3, "the coordinator to take the amendment")
        gate.opened.set()
        assert live.server.wait_finished(_WAIT)
        committed = live.server.coordinator._versions.current
        report = live.server.write_report()

    # Assert: three rounds of the same mean, as a 3-round run commits; the report says what was amended.
    assert code == 0
    assert live.errors == {}
    assert committed is not None
    assert committed.round == 3
    np.testing.assert_allclose(committed.vector, MODEL.initial + 3 * _mean(live.sites, set(EXAMPLES)), atol=1e-6)
    amendments = json.loads(report[0].read_text())["amendments"]
    assert [c["field"] for a in amendments for c in a["changes"]] == ["rounds"]


def test_a_site_added_to_a_live_run_takes_part_from_the_next_round(tmp_path: Path) -> None:
    # Prepare: clinical and finance only are allowed, 3 rounds; round 2 has started (its sites held) when legal is
    # added, so legal takes part from round 3.
    allowed = {w: n for w, n in EXAMPLES.items() if w != "legal"}
    workers = [{"id": w, "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest()} for w in allowed]
    gate = Gate(round=2)
    with live_run(tmp_path, gate, examples=allowed, rounds=3, workers=workers) as live:
        _until(lambda: live.committed_round() == 1, "round 1 to commit")
        amended = json.loads(live.config.read_text())
        amended["workers"].append(
            {"id": "legal", "token_sha256": hashlib.sha256(token_of("legal").encode()).hexdigest()}
        )
        live.config.write_text(json.dumps(amended))

        # Execute: add legal, start its site, let round 2 begin once it has joined.
        assert live.operator("amend") == 0
        _until(lambda: len(live.server.coordinator.settings.workers) == 3, "the amendment to take effect")
        (legal,) = make_sites(live.server.port, MODEL, {"legal": 600}, token_of=token_of, chunk_bytes=1024)
        legal.delta = np.random.default_rng(2).normal(0, 0.01, MANIFEST.numel).astype(np.float32)
        late = threading.Thread(target=lambda: live.errors.update(run_sites([legal])), daemon=True)
        late.start()
        _until(lambda: "legal" in live.server.coordinator._joined, "legal to join")
        gate.opened.set()
        assert live.server.wait_finished(_WAIT)
        late.join(DEADLINE_S)
        committed = live.server.coordinator._versions.current
        rounds = {r.round: r.participants for r in live.server._store.rounds() if r.status == "completed"}

    # Assert: rounds 1 and 2 without legal, round 3 with it; beside legal's share, what the two sites commit.
    assert live.errors == {}
    assert [rounds[r] for r in (1, 2, 3)] == [("clinical", "finance")] * 2 + [("clinical", "finance", "legal")]
    everyone = [*live.sites, legal]
    expected = MODEL.initial + 2 * _mean(everyone, {"clinical", "finance"}) + _mean(everyone, set(EXAMPLES))
    assert committed is not None
    np.testing.assert_allclose(committed.vector, expected, atol=1e-6)


def test_a_token_rotated_between_rounds_of_a_live_run_changes_nothing_it_commits(tmp_path: Path) -> None:
    gate = Gate(round=2)
    with live_run(tmp_path, gate, rounds=2) as live:
        _until(lambda: gate.held == len(EXAMPLES), "every site to be held before round 2")
        amended = json.loads(live.config.read_text())
        rotated = "rotated-" + token_of("finance")
        for entry in amended["workers"]:
            if entry["id"] == "finance":
                entry["token_sha256"] = hashlib.sha256(rotated.encode()).hexdigest()
        live.config.write_text(json.dumps(amended))

        # Execute: rotate finance's token; the site starts using the new one before round 2.
        assert live.operator("amend") == 0
        digest = hashlib.sha256(rotated.encode()).hexdigest()
        _until(lambda: any(w.token_sha256 == digest for w in live.server.coordinator.settings.workers), "the amendment")
        finance = next(s for s in live.sites if s.worker == "finance")
        old_client = finance.client
        finance.client = CoordinatorClient(
            target=f"127.0.0.1:{live.server.port}",
            worker_id="finance",
            token=rotated,
            retry=FAST_RETRY,
            chunk_bytes=1024,
        )
        old_client.close()
        gate.opened.set()
        assert live.server.wait_finished(_WAIT)
        committed = live.server.coordinator._versions.current

    # Assert: two rounds, every site in both, the same model as without the rotation.
    assert live.errors == {}
    assert committed is not None
    np.testing.assert_allclose(committed.vector, MODEL.initial + 2 * _mean(live.sites, set(EXAMPLES)), atol=1e-6)


def test_a_certificate_renewed_between_rounds_of_a_live_run_changes_nothing_it_commits(tmp_path: Path) -> None:
    # Prepare: mutual TLS; every site has its certificate from the consortium's CA.
    pki = tmp_path / "pki"
    issue_certificates(pki, workers=list(EXAMPLES))
    listen = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "tls": {"cert": pki / "coordinator.crt", "key": pki / "coordinator.key", "client_ca": pki / "ca.crt"},
    }
    tls = {w: TlsClientSettings(ca=pki / "ca.crt", cert=pki / f"{w}.crt", key=pki / f"{w}.key") for w in EXAMPLES}
    gate = Gate(round=2)
    with live_run(tmp_path, gate, rounds=2, listen=listen, tls=tls) as live:
        _until(lambda: gate.held == len(EXAMPLES), "every site to be held before round 2")

        # Execute: finance renews its certificate between rounds, with a new key made at the site.
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        make_request(key=renewed / "tls.key", csr=renewed / "tls.csr", worker_id="finance")
        signed = main(
            [
                "certs",
                "sign",
                "--ca-dir",
                str(pki),
                "--csr",
                str(renewed / "tls.csr"),
                "--out",
                str(renewed / "tls.crt"),
            ]
        )
        finance = next(s for s in live.sites if s.worker == "finance")
        old_client = finance.client
        finance.client = CoordinatorClient(
            target=f"127.0.0.1:{live.server.port}",
            worker_id="finance",
            token=token_of("finance"),
            retry=FAST_RETRY,
            chunk_bytes=1024,
            tls=TlsClientSettings(ca=pki / "ca.crt", cert=renewed / "tls.crt", key=renewed / "tls.key"),
        )
        old_client.close()
        gate.opened.set()
        assert live.server.wait_finished(_WAIT)
        committed = live.server.coordinator._versions.current

    # Assert: both rounds with every site; the model is what the run commits without the renewal.
    assert signed == 0
    assert live.errors == {}
    assert committed is not None
    np.testing.assert_allclose(committed.vector, MODEL.initial + 2 * _mean(live.sites, set(EXAMPLES)), atol=1e-6)


@pytest.mark.parametrize("now", [False, True], ids=["after-the-round", "now"])
def test_stop_ends_a_live_run_and_the_sites_are_told_it_finished(tmp_path: Path, now: bool) -> None:
    # Prepare: a run of 3 rounds whose sites are held before round 2 trains.
    gate = Gate(round=2)
    with live_run(tmp_path, gate, rounds=3) as live:
        _until(lambda: live.committed_round() == 1, "round 1 to commit")
        _until(lambda: live.server.coordinator.phase == "train", "round 2 to start")

        # Execute
        code = live.operator("stop", *(["--now"] if now else []), "--reason", "budget review")
        _until(lambda: live.server.coordinator.stopping is not None, "the coordinator to take the request")
        gate.opened.set()
        assert live.server.wait_finished(_WAIT)
        status = live.server.status()
        told = CoordinatorClient(
            target=f"127.0.0.1:{live.server.port}", worker_id="legal", token=token_of("legal"), retry=FAST_RETRY
        )
        finished = told.poll(MODEL.run_id)
        told.close()

    # Assert: after the round in progress (2), or at once (at 1); every site finished without an error, told why.
    assert code == 0
    assert live.errors == {}
    assert (status.state, status.stopped) == ("stopped", "budget review")
    assert status.last_commit is not None
    assert status.last_commit["round"] == (1 if now else 2)
    assert (finished.kind, finished.reason) == (
        TaskKind.FINISHED,
        f"an operator stopped the run at round {1 if now else 2}: budget review",
    )


def _fedlora_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlora_server", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_a_finished_run_started_again_says_so_and_exits_0_at_once_without_waiting_for_workers(tmp_path: Path) -> None:
    # Prepare: a run of one round, committed and evaluated: finished.
    state = tmp_path / "state"
    one_round_committed(state, rounds=1)
    config = _config(tmp_path, run_settings(state, rounds=1))

    # Execute
    result = _fedlora_server("--config", str(config))

    # Assert: its summary on stdout, no port bound (no "listening" line), exit 0.
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "run test-run: finished: 1 of 1 rounds"
    assert '"listening"' not in result.stdout


def test_a_failed_run_says_why_at_every_start_until_retried_and_then_resumes(tmp_path: Path) -> None:
    # Prepare: a run that failed in round 2 (a site left, below min_workers).
    state = tmp_path / "state"
    store = SqliteStore(state / "coordinator.db")
    try:
        commit_round_one(state, store)
        coordinator = Coordinator(
            settings=run_settings(state), store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock()
        )
        for w in ("clinical", "finance", "legal"):
            coordinator.join(w, 100)
        coordinator.leave("finance", "the disk broke")
        assert coordinator.failure is not None
    finally:
        store.close()
    config = _config(tmp_path, run_settings(state))

    # Execute: start it (refused to go on), retry it, start it again (in process, to watch it wait for workers).
    failed = _fedlora_server("--config", str(config))
    retried = main(["retry", "--config", str(config)])
    with CoordinatorServer(settings=run_settings(state)) as server:
        resumed = (server.coordinator.failure, server.coordinator.phase, server.status().state)

    # Assert
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.splitlines()[0].startswith("run test-run: failed at round 2 of 2: 2 of the 3 workers needed")
    assert retried == 0
    assert resumed == (None, "admission", "running")


def test_status_reads_the_state_whether_or_not_the_coordinator_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run with round 1 committed.
    state = tmp_path / "state"
    one_round_committed(state)
    settings = run_settings(state, listen={"host": "127.0.0.1", "port": 0, "metrics_port": None})
    config = _config(tmp_path, settings)
    capsys.readouterr()  # what making the state logged

    # Execute: without a coordinator, then with one serving on a port of its own.
    assert main(["status", "--config", str(config), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    with CoordinatorServer(settings=settings) as server:
        capsys.readouterr()
        assert main(["status", "--config", str(config), f"--listen.port={server.port}"]) == 0
        online = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("run ", "coordinator:"))]

    # Assert
    assert offline["state"] == "running"
    assert (offline["round"], offline["phase"]) == (2, "training")
    assert offline["last_commit"]["version"] == 1
    assert [s["id"] for s in offline["sites"]] == ["clinical", "finance", "legal"]
    assert offline["coordinator"] == "not asked (listen.port is 0)"
    assert online[0] == "run test-run: round 2 of 2, attempt 1: failed, the next attempt not started"
    assert online[1] == "coordinator: SERVING"


def test_a_port_in_use_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, run_settings(tmp_path / "state", listen={"host": "127.0.0.1", "port": port}))

        result = _fedlora_server("--config", str(config))

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"fedlora-server: listen.port: cannot listen on 127.0.0.1:{port}: another program holds it, "
        "or it is no address of this host"
    )
    assert "Traceback" not in result.stderr
