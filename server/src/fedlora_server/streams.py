"""Bounds on the streams the coordinator holds open: how many in all and per worker, how long idle,
how long in all (in proportion to what the stream declared it carries).

A held stream costs a server thread; without bounds, a few idle or slow callers could take every
thread and stall polls and health checks. One reaper thread cancels streams past their deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import structlog

from fedlora_server.config import LimitSettings
from fedlora_server.errors import ResourceExhausted

__all__ = ["StreamGuard", "Watched"]

log = structlog.get_logger()


@dataclass(eq=False)
class Watched:
    """One open stream: when it last moved, when it must end by, and whether the reaper ended it."""

    context: grpc.RpcContext
    idle_s: float
    started: float
    last: float
    total_s: float
    expired: str = ""

    def touch(self, now: float) -> None:
        self.last = now

    def allow(self, seconds: float) -> None:
        """The stream has declared its size: it may take this long in all."""
        self.total_s = seconds


class StreamGuard:
    """Admits streams within the limits, and cancels those idle or slower than the limits allow."""

    def __init__(
        self, limits: LimitSettings, *, clock: Callable[[], float] = time.monotonic, period_s: float = 0.25
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._period_s = period_s
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._watched: set[Watched] = set()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="stream-reaper", daemon=True)
        self._reaper.start()

    def total_s(self, nbytes: int) -> float:
        """How long a stream of nbytes may take: the idle allowance plus nbytes at the slowest accepted rate."""
        return self._limits.stream_idle_s + nbytes / self._limits.stream_min_bytes_per_s

    @contextmanager
    def admitted(self, worker_id: str, context: grpc.RpcContext) -> Iterator[Watched]:
        """Hold a stream slot of `worker_id` while the block runs; RESOURCE_EXHAUSTED when none is free."""
        watched = self.admit(worker_id, context)
        try:
            yield watched
        finally:
            self.release(worker_id, watched)

    def admit(self, worker_id: str, context: grpc.RpcContext) -> Watched:
        """Take a stream slot of `worker_id` (release it with `release`); RESOURCE_EXHAUSTED when none is free."""
        with self._lock:
            held = sum(self._open.values())
            if held >= self._limits.max_streams:
                raise ResourceExhausted(f"{held} streams are open, the most the coordinator holds; retry later")
            if self._open.get(worker_id, 0) >= self._limits.max_streams_per_worker:
                raise ResourceExhausted(
                    f"{worker_id} already has {self._limits.max_streams_per_worker} streams open; finish or cancel one"
                )
            self._open[worker_id] = self._open.get(worker_id, 0) + 1
            now = self._clock()
            watched = Watched(context, self._limits.stream_idle_s, now, now, self._limits.stream_idle_s)
            self._watched.add(watched)
        return watched

    def release(self, worker_id: str, watched: Watched) -> None:
        with self._lock:
            self._watched.discard(watched)
            self._open[worker_id] -= 1

    def _reap(self) -> None:
        while not self._stopping.wait(self._period_s):
            now = self._clock()
            with self._lock:
                due = [w for w in self._watched if not w.expired and self._overdue(w, now)]
            for watched in due:
                watched.expired = self._overdue(watched, now)
                log.warning("stream_cancelled", reason=watched.expired)
                watched.context.cancel()

    @staticmethod
    def _overdue(watched: Watched, now: float) -> str:
        if now - watched.last > watched.idle_s:
            return f"no message for {watched.idle_s:g} s"
        if now - watched.started > watched.total_s:
            return f"not done within the {watched.total_s:.0f} s its size allows"
        return ""

    def shutdown(self) -> None:
        self._stopping.set()
        self._reaper.join()
