"""`fedlora-server --check` (the container health check) and what the health service reports, and when."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import RunRecord, SqliteStore
from tests.deploy.support import free_port, write_yaml
from tests.server.conftest import WORKERS, connect, run_settings

TICK = timedelta(milliseconds=250)  # CoordinatorServer's default deadline clock


def _config(path: Path, settings: RunSettings, port: int) -> Path:
    data: dict[str, Any] = settings.model_dump(mode="json", exclude_defaults=True)
    data["listen"] = {**data.get("listen", {}), "port": port}
    return write_yaml(path, data)


def test_check_exits_0_when_the_coordinator_answers_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = run_settings(tmp_path / "state")
    with CoordinatorServer(settings=settings) as server:
        config = _config(tmp_path / "run.yaml", settings, server.port)

        code = main(["--check", "--config", str(config)])

    assert code == 0
    assert capsys.readouterr().out.endswith(f"fedlora-server: 127.0.0.1:{server.port}: SERVING\n")


def test_check_speaks_mutual_tls_with_the_coordinators_own_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = tmp_path / "tls"
    issue_certificates(tls, workers=["clinical"])
    listen = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "tls": {"cert": tls / "coordinator.crt", "key": tls / "coordinator.key", "client_ca": tls / "ca.crt"},
    }
    settings = run_settings(tmp_path / "state", listen=listen)
    with CoordinatorServer(settings=settings) as server:
        config = _config(tmp_path / "run.yaml", settings, server.port)

        code = main(["--check", "--config", str(config)])

    assert code == 0
    assert capsys.readouterr().out.endswith(": SERVING\n")


def test_check_exits_1_with_one_line_when_nothing_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "run.yaml", run_settings(tmp_path / "state"), free_port())

    code = main(["--check", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.endswith(": UNAVAILABLE\n")
    assert err.count("\n") == 1


def test_check_needs_the_real_port_not_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "run.yaml", run_settings(tmp_path / "state"), 0)

    code = main(["--check", "--config", str(config)])

    assert code == 2
    assert "listen.port: 0" in capsys.readouterr().err


class _SlowRestore(SqliteStore):
    """A store whose restore (load_run) waits until the test lets it go on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.restoring = threading.Event()
        self.go_on = threading.Event()

    def load_run(self) -> RunRecord | None:
        self.restoring.set()
        assert self.go_on.wait(30)
        return super().load_run()


def test_a_coordinator_restoring_its_state_is_not_healthy_and_is_serving_once_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    settings = run_settings(tmp_path / "state", listen={"host": "127.0.0.1", "port": port, "metrics_port": None})
    config = _config(tmp_path / "run.yaml", settings, port)
    store = _SlowRestore(tmp_path / "state" / "coordinator.db")
    built: list[CoordinatorServer] = []
    constructing = threading.Thread(target=lambda: built.append(CoordinatorServer(settings=settings, store=store)))
    constructing.start()
    try:
        assert store.restoring.wait(30)
        during_restore = main(["--check", "--config", str(config)])
    finally:
        store.go_on.set()
        constructing.join(30)
    with built[0] as server:
        after_start = main(["--check", "--config", str(config)])
        phase = server.coordinator.phase

    lines = capsys.readouterr()
    assert during_restore == 1
    assert lines.err.endswith(": UNAVAILABLE\n")
    assert after_start == 0
    assert lines.out.endswith(": SERVING\n")
    assert phase == "admission"


def test_a_run_that_failed_reports_not_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = run_settings(tmp_path / "state")
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        config = _config(tmp_path / "run.yaml", settings, server.port)
        for worker in WORKERS:
            wire.join(worker)
        wire.leave("clinical", "out of memory")
        assert server.wait_finished(timedelta(seconds=30))
        deadline = time.monotonic() + 10  # the deadline clock turns health off at its next tick
        while (code := main(["--check", "--config", str(config)])) == 0 and time.monotonic() < deadline:
            time.sleep(TICK.total_seconds())
        failure = server.coordinator.failure

    assert failure is not None
    assert "out of memory" in failure
    assert code == 1
    assert capsys.readouterr().err.endswith(": NOT_SERVING\n")
