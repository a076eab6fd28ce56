"""The coordinator's clock in a simulation: time as the sites would live it, each on a machine of its own.

A run's deadlines (`timeouts.train_s`, `timeouts.phase_base_s`) are sized for sites that have their machines to
themselves. Here the sites that work at once share this machine's cores, each slower the more of them work. So
the clock the coordinator reads runs at the pace of a working site: wall time x min(1, cores / (working sites x
torch threads each)). A deadline passes when it would have on the sites' own machines, however many sites one
simulation holds and however loaded the machine; with nobody working (all wait on a deadline) it keeps wall pace.
Held polls wait on wall time, as they only make a worker hear of its work sooner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["ContendedClock"]


class ContendedClock:
    """Seconds since the epoch, advancing more slowly while more sites work than the cores can serve. Thread-safe."""

    def __init__(
        self,
        *,
        cores: int,
        threads: int,
        start: float | None = None,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        if cores < 1 or threads < 1:
            raise ValueError(f"cores and threads must be >= 1, got {cores} and {threads}")
        self._cores = cores
        self._threads = threads
        self._wall = wall
        self._lock = threading.Lock()
        self._working: set[str] = set()
        self._wall_at = wall()
        self._now = time.time() if start is None else start

    def __call__(self) -> float:
        with self._lock:
            self._advance()
            return self._now

    @property
    def pace(self) -> float:
        """Clock seconds per wall second now."""
        with self._lock:
            return self._pace()

    def working(self, member: str, busy: bool) -> None:
        """`member` started (busy) or stopped working on a task: from now on the clock keeps the new pace."""
        with self._lock:
            self._advance()
            if busy:
                self._working.add(member)
            else:
                self._working.discard(member)

    def _pace(self) -> float:
        demand = len(self._working) * self._threads
        return 1.0 if demand <= self._cores else self._cores / demand

    def _advance(self) -> None:
        wall = self._wall()
        self._now += (wall - self._wall_at) * self._pace()
        self._wall_at = wall
