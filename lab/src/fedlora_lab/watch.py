"""A live line per round while a local federation runs: where its state says it stands (phase, sites, loss).

Read from the coordinator's state directory as `fedlora-server status` reads it (a snapshot: the running
coordinator is not disturbed), whichever engine runs the federation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlora_server.run_status import RunStatus, read_status
from fedlora_server.store import SqliteStore, StateError

__all__ = ["status_line", "watching"]


def status_line(status: RunStatus) -> str:
    """One line: the round and phase, the sites taking part, the latest held-out loss."""
    sites = sum(1 for s in status.sites if s.left is None)
    loss = "" if status.eval_loss is None else f", held-out loss {status.eval_loss:.3f}"
    head = status.lines()[0].removeprefix(f"run {status.run_id}: ")
    return f"{head} ({sites} sites{loss})"


def _read(database: Path, rounds: int) -> RunStatus | None:
    if not database.exists():
        return None
    try:
        store = SqliteStore.snapshot(database)
    except StateError:  # caught between two writes of its log: the next look sees it whole
        return None
    try:
        return read_status(store, rounds=rounds)
    finally:
        store.close()


@contextmanager
def watching(state_dir: Path, *, rounds: int, say: Callable[[str], None], every_s: float = 1.0) -> Iterator[None]:
    """Inside the block, `say` gets a line each time the run's round, phase or loss changes."""
    stop = threading.Event()

    def watch() -> None:
        last = ""
        while not stop.wait(every_s):
            status = _read(state_dir / "coordinator.db", rounds)
            line = "" if status is None else status_line(status)
            if line and line != last:
                say(line)
                last = line

    thread = threading.Thread(target=watch, name="watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
