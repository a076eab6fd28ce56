"""Bounds on the calls the coordinator holds open (every gRPC call is an HTTP/2 stream): how many of each
class at once and on which threads, how many per worker, how long a request may take to arrive, and how
long an upload or download may idle or last (in proportion to what it declared it carries).

A held call costs a server thread; without bounds, a few idle or slow callers could take every thread and
stall polls and health checks. So each class of call (allowed workers, health checks) has a budget and
threads of its own that no other class can take, refusals are answered on threads of their own, and one
reaper thread cancels calls past their deadline: a request not arrived in time, a stream idle or too slow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import structlog

from fedlora_server.config import LimitSettings
from fedlora_server.errors import ResourceExhausted

__all__ = ["Budget", "Lane", "OverBudget", "Slot", "StreamGuard", "Watched"]

log = structlog.get_logger()


class OverBudget(ResourceExhausted):
    """No place is free: in all (`per_caller` false), or for this caller."""

    def __init__(self, message: str, *, per_caller: bool) -> None:
        super().__init__(message)
        self.per_caller = per_caller


class Slot:
    """One call's place in a budget; `release()` gives it back once, however often it is called."""

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


class Budget:
    """Calls of one kind in flight: at most `limit` in all, and `per_caller` for any one caller."""

    def __init__(self, name: str, limit: int, *, per_caller: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self._per_caller = per_caller
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def take(self, caller: str = "") -> Slot:
        """A place for one more call of `caller`; OverBudget (RESOURCE_EXHAUSTED) naming the bound when none is free."""
        with self._lock:
            held = sum(self._held.values())
            if held >= self.limit:
                raise OverBudget(
                    f"{held} {self.name} are open, the most the coordinator holds; retry later", per_caller=False
                )
            mine = self._held.get(caller, 0)
            if self._per_caller is not None and mine >= self._per_caller:
                raise OverBudget(f"{caller} already has {mine} {self.name} open; finish or cancel one", per_caller=True)
            self._held[caller] = mine + 1
        return Slot(lambda: self._give_back(caller))

    def held(self) -> int:
        """Places taken now, all callers together."""
        with self._lock:
            return sum(self._held.values())

    def _give_back(self, caller: str) -> None:
        with self._lock:
            self._held[caller] -= 1
            if not self._held[caller]:
                del self._held[caller]


class Lane:
    """A class of calls: its budget, and as many threads of its own as the budget has places."""

    def __init__(self, name: str, budget: Budget) -> None:
        self.name = name
        self.budget = budget
        self.threads = ThreadPoolExecutor(max_workers=budget.limit, thread_name_prefix=f"rpc-{name}")


@dataclass(eq=False)
class Watched:
    """One open call: when it last moved, when it must end by, the stream slot it holds, and whether the
    reaper ended it."""

    context: grpc.RpcContext
    idle_s: float
    started: float
    last: float
    total_s: float
    slot: Slot | None = None
    on_expired: Callable[[], None] = lambda: None
    expired: str = ""

    def touch(self, now: float) -> None:
        self.last = now

    def allow(self, seconds: float) -> None:
        """The stream has declared its size: it may take this long in all."""
        self.total_s = seconds


class StreamGuard:
    """Admits calls within the limits of their class, and cancels those whose request is late or whose stream
    is idle or slower than the limits allow."""

    def __init__(
        self, limits: LimitSettings, *, clock: Callable[[], float] = time.monotonic, period_s: float = 0.25
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._period_s = period_s
        self._lock = threading.Lock()
        self._streams = Budget("streams", limits.max_streams, per_caller=limits.max_streams_per_worker)
        self._watched: set[Watched] = set()
        self.workers = Lane("workers", Budget("calls", limits.max_worker_calls, per_caller=limits.max_calls_per_worker))
        self.health = Lane("health", Budget("health checks", limits.max_health_calls))
        self.refusals = ThreadPoolExecutor(max_workers=limits.refusal_threads, thread_name_prefix="rpc-refusals")
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
            self.release(watched)

    def admit(self, worker_id: str, context: grpc.RpcContext) -> Watched:
        """Take a stream slot of `worker_id` (release it with `release`); RESOURCE_EXHAUSTED when none is free."""
        slot = self._streams.take(worker_id)
        return self._watch(context, self._limits.stream_idle_s, slot=slot)

    def release(self, watched: Watched) -> None:
        """End the watch of an admitted stream and give its slot back."""
        self._unwatch(watched)

    def open_streams(self) -> int:
        """Uploads and downloads holding a stream slot now."""
        return self._streams.held()

    @contextmanager
    def reading(self, context: grpc.RpcContext, *, late: Callable[[], None]) -> Iterator[Watched]:
        """Watch the read of a call's request message: unless it arrives within request_read_s, `late()` is
        called and the call cancelled."""
        watched = self._watch(context, self._limits.request_read_s, on_expired=late)
        try:
            yield watched
        finally:
            self._unwatch(watched)

    def _watch(
        self,
        context: grpc.RpcContext,
        idle_s: float,
        *,
        slot: Slot | None = None,
        on_expired: Callable[[], None] = lambda: None,
    ) -> Watched:
        now = self._clock()
        watched = Watched(context, idle_s, now, now, idle_s, slot, on_expired)
        with self._lock:
            self._watched.add(watched)
        return watched

    def _unwatch(self, watched: Watched) -> None:
        with self._lock:
            self._watched.discard(watched)
        if watched.slot is not None:
            watched.slot.release()

    def _reap(self) -> None:
        while not self._stopping.wait(self._period_s):
            now = self._clock()
            with self._lock:
                due = [w for w in self._watched if not w.expired and self._overdue(w, now)]
            for watched in due:
                watched.expired = self._overdue(watched, now)
                log.warning("stream_cancelled", reason=watched.expired)
                watched.on_expired()
                watched.context.cancel()

    @staticmethod
    def _overdue(watched: Watched, now: float) -> str:
        if now - watched.last > watched.idle_s:
            return f"no message for {watched.idle_s:g} s"
        if now - watched.started > watched.total_s:
            return f"not done within the {watched.total_s:.0f} s its size allows"
        return ""

    def shutdown(self) -> None:
        """Stop the reaper and the threads of every class (calls still running finish by themselves)."""
        self._stopping.set()
        self._reaper.join()
        for threads in (self.workers.threads, self.health.threads, self.refusals):
            threads.shutdown(wait=False, cancel_futures=True)
