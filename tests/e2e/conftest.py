"""One uninterrupted federation of processes per session, started on first use and shared: the crash
matrix compares its killed runs' adapters with this one's, the leak test searches what it left and
what its metrics pages said while it ran."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedlora_lab.model_factory import MadeModel
from tests.e2e.processes import Federation, tiny_plan


@dataclass
class ReferenceRun:
    """An uninterrupted run, its metrics pages scraped while it ran (every distinct page kept)."""

    fed: Federation
    pages: dict[str, set[str]] = field(default_factory=dict)
    codes: dict[str, int] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _scraper: threading.Thread | None = None

    def start(self) -> None:
        self.fed.start_all()
        self._scraper = threading.Thread(target=self._scrape, name="metrics-scraper", daemon=True)
        self._scraper.start()

    def finished(self, timeout_s: float = 600) -> dict[str, int]:
        """Wait for every process to exit by itself (once); their exit codes."""
        if self.codes is None:
            try:
                self.codes = self.fed.wait_exit(timeout_s)
            finally:
                self._stop.set()
                if self._scraper is not None:
                    self._scraper.join()
        return self.codes

    def _ports(self) -> dict[str, int]:
        ports = {}
        for name in self.fed.logs:
            for event in self.fed.events(name):
                port = event.get("metrics_port") if event.get("event") == "coordinator_listening" else None
                port = port or (event.get("port") if event.get("event") == "metrics_listening" else None)
                if port:
                    ports[name] = int(port)
        return ports

    def _scrape(self) -> None:
        while not self._stop.wait(0.25):
            for name, port in self._ports().items():
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response,
                ):
                    self.pages.setdefault(name, set()).add(response.read().decode())

    def adapter(self) -> Path:
        return self.fed.out / "adapter"


@pytest.fixture(scope="session")
def reference_run(lab_model: MadeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReferenceRun]:
    """Started at first request; a test that needs it finished calls `finished()`."""
    fed = Federation(tiny_plan(tmp_path_factory.mktemp("reference"), lab_model.path))
    run = ReferenceRun(fed)
    try:
        run.start()
        yield run
    finally:
        run._stop.set()
        fed.close()
