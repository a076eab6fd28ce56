"""SIGTERM ends `fedlora-worker` within 5 s in any state, with exit status 143 (stopped by a signal before its run
finished): orchestrators wait that long or less before they kill, and what a worker leaves half done the
coordinator already treats as a dropout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlora_server.server import CoordinatorServer
from tests.server.conftest import run_settings, token_of

STOP_BOUND_S = 5.0


@contextmanager
def silent_coordinator() -> Iterator[int]:
    """A port that accepts connections and never answers: every call to it hangs until its deadline."""
    held: list[socket.socket] = []
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.05)

        def accept() -> None:
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join()
            for connection in held:
                connection.close()


def _worker_yaml(tmp_path: Path, base: Path, port: int, texts: list[str], extra: str = "") -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    config = tmp_path / "worker.yaml"
    config.write_text(
        f"worker_id: clinical\ntoken: {token_of('clinical')}\nbase_model: {base}\n"
        f"coordinator: 127.0.0.1:{port}\ndata:\n  train: [{train}]\nmetrics_port: 0\nthreads: 1\n"
        "retry:\n  attempts: 100\n  initial_backoff_s: 5.0\n  max_backoff_s: 30.0\n" + extra
    )
    return config


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedlora_worker", "--config", str(config)], stderr=out)


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.1)


def _stopped_within(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, time.monotonic() - started


def test_sigterm_ends_a_worker_waiting_on_a_coordinator_that_never_answers(
    tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]
) -> None:
    # Prepare: the worker's join hangs on its 30 s deadline, and its retries would wait 5-30 s each.
    log = tmp_path / "worker.log"
    with silent_coordinator() as port:
        process = _start(_worker_yaml(tmp_path, tiny_base_model, port, make_sentences(8, 1)), log)
        _until(lambda: any(e.get("event") == "metrics_listening" for e in _events(log)), "the worker to start")

        # Execute
        code, took = _stopped_within(process)

    # Assert
    assert code == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert took < STOP_BOUND_S, f"stopped after {took:.1f} s"


def _training_steps(log: Path) -> float | None:
    """The worker's fedlora_worker_training_steps_total as its metrics endpoint serves it now (None: not yet)."""
    started = next((e for e in _events(log) if e.get("event") == "metrics_listening"), None)
    if started is None:
        return None
    page = urllib.request.urlopen(f"http://127.0.0.1:{started['port']}/metrics", timeout=5).read().decode()
    steps = [line for line in page.splitlines() if line.startswith("fedlora_worker_training_steps_total")]
    return float(steps[0].split()[-1]) if steps else None


def test_a_worker_whose_run_finished_serves_its_last_counters_for_its_linger_and_a_signal_cuts_it_short(
    tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]
) -> None:
    # Prepare: a one-round run of 3 steps; the worker lingers far longer than the test waits.
    settings = run_settings(
        tmp_path / "state", min_workers=1, rounds=1, training={"local_steps": 3}, limits={"chunk_bytes": 2**20}
    )
    log = tmp_path / "worker.log"
    yaml = _worker_yaml(tmp_path, tiny_base_model, 0, make_sentences(16, 3), extra="metrics_linger_s: 600\n")
    with CoordinatorServer(settings=settings) as server:
        yaml.write_text(yaml.read_text().replace("127.0.0.1:0", f"127.0.0.1:{server.port}"))
        process = _start(yaml, log)
        _until(lambda: any(e.get("event") == "run_finished" for e in _events(log)), "the run to finish")

        # Execute: after the run, the endpoint still answers with the round's count; then SIGTERM.
        steps = _training_steps(log)
        alive = process.poll() is None
        code, took = _stopped_within(process)

    # Assert
    assert (steps, alive) == (3.0, True)
    assert code == 0, log.read_text()[-2000:]  # its run had finished: a signal while it lingers is no failure
    assert took < STOP_BOUND_S, f"stopped after {took:.1f} s"


def test_sigterm_ends_a_worker_in_the_middle_of_its_local_training(
    tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]
) -> None:
    # Prepare: a coordinator whose round asks for far more local steps than the test will wait for.
    settings = run_settings(
        tmp_path / "state", min_workers=1, rounds=1, training={"local_steps": 100_000}, limits={"chunk_bytes": 2**20}
    )
    log = tmp_path / "worker.log"
    with CoordinatorServer(settings=settings) as server:
        process = _start(_worker_yaml(tmp_path, tiny_base_model, server.port, make_sentences(32, 2)), log)

        _until(lambda: (_training_steps(log) or 0) >= 3, "the worker to train")

        # Execute
        code, took = _stopped_within(process)
        phase = server.coordinator.phase

    # Assert: it stopped mid-round (nothing was uploaded), promptly.
    assert code == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert took < STOP_BOUND_S, f"stopped after {took:.1f} s"
    assert phase == "train"
    assert not any(e.get("event") == "upload_opened" for e in _events(log))
