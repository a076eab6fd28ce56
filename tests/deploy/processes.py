"""The federation's programs as OS processes, each logging to a file, all stopped when the block ends."""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.deploy.support import program_env


class Processes:
    """`with Processes(logs) as p:` start programs; leaving the block terminates whatever still runs."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path, prefix: Sequence[str] = (), stdout_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start `prefix + argv` (a prefix such as `ip netns exec NS`) in `cwd`; stderr goes to logs/NAME.log."""
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        process = subprocess.Popen(
            [*prefix, *argv],
            cwd=cwd,
            env=program_env(),
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
        )
        self._running[name] = process
        return process

    def wait_all(self, timeout: float) -> dict[str, int]:
        """Every program's exit code; AssertionError naming the first that did not end in time."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name, process in self._running.items():
            try:
                codes[name] = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still runs after {timeout:.0f} s; {self.tail(name)}") from None
        return codes

    def tail(self, name: str, chars: int = 3000) -> str:
        return f"{name}.log ends: {(self.logs / f'{name}.log').read_text(errors='replace')[-chars:]}"

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process in self._running.values():
            if process.poll() is None:
                process.terminate()
        for process in self._running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for log in self._files:
            log.close()


def listening(coordinator: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    """The `{"event": "listening", "port": ...}` line fedlora-server prints once it serves."""
    assert coordinator.stdout is not None
    ready, _, _ = select.select([coordinator.stdout], [], [], timeout)
    line = coordinator.stdout.readline() if ready else b""
    if not line:
        raise AssertionError(f"the coordinator did not start listening (exit code {coordinator.poll()})")
    event: dict[str, Any] = json.loads(line)
    assert event["event"] == "listening", event
    return event
