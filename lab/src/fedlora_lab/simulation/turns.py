"""Whose turn it is: virtual clients act on the coordinator one at a time, round robin in a fixed order.

A client takes the turn when it polls and keeps it while it works on the task it was given
(download, train, upload, evaluate, audit: everything that touches the shared model). It passes
the turn on when a poll brings nothing to do (WAIT), when it idles, and for good once it finishes
or leaves. So exactly one client trains at a time, with every torch thread, and the order in
which updates reach the coordinator is fixed by the order of the clients.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["Turns", "TurnsStopped"]


class TurnsStopped(Exception):
    """The simulation is shutting down: no client gets the turn again."""


class Turns:
    """A baton passed round robin among the clients still taking part. Thread-safe."""

    def __init__(self, members: Sequence[str]) -> None:
        if not members or len(set(members)) != len(members):
            raise ValueError(f"members must be distinct and at least one, got {list(members)}")
        self._order = tuple(members)
        self._active = list(members)
        self._holder: str | None = members[0]
        self._last_waited: dict[str, bool] = dict.fromkeys(members, False)
        self._waits = 0
        self._stopped = False
        self._changed = threading.Condition()

    @property
    def holder(self) -> str | None:
        """Whose turn it is; None once every client finished or left."""
        with self._changed:
            return self._holder

    @property
    def active(self) -> tuple[str, ...]:
        with self._changed:
            return tuple(self._active)

    def take(self, member: str) -> None:
        """Block until it is `member`'s turn; TurnsStopped once the simulation stops."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopped or self._holder == member)
            if self._stopped:
                raise TurnsStopped("the simulation stopped")

    def answered(self, member: str, *, work: bool) -> None:
        """`member`, holding the turn, was told to work (it keeps the turn) or to wait (it passes it on)."""
        with self._changed:
            self._last_waited[member] = not work
            if work:
                self._waits = 0
                return
            self._waits += 1
            self._pass_on(member)

    def pause(self, member: str, seconds: float) -> bool:
        """Called where the client would sleep: give up the turn, then sleep only if the federation is stalled.

        After a WAIT while others still have work, sleeping would only slow the simulation: the
        client's next poll blocks until the turn comes back anyway. After a full round of WAITs
        (nobody has work: the coordinator waits for a deadline), or when the client itself chose to
        wait after a task, it sleeps for `seconds`. True if the simulation stopped.
        """
        with self._changed:
            if self._holder == member:
                self._pass_on(member)
            stalled = not self._last_waited.get(member, False) or self._waits >= len(self._active)
            if stalled and not self._stopped:
                self._changed.wait_for(lambda: self._stopped, timeout=seconds)
            return self._stopped

    def retire(self, member: str) -> None:
        """`member` takes no more turns (it finished, left, or its thread ended)."""
        with self._changed:
            if member not in self._active:
                return
            if self._holder == member:
                self._pass_on(member)
            self._active.remove(member)
            if self._holder == member:  # it was the last one
                self._holder = None
            self._changed.notify_all()

    def stop(self) -> None:
        """Wake every waiting client; from now on take() raises TurnsStopped. Safe to call twice."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _pass_on(self, member: str) -> None:
        """The next active client after `member` in the fixed order gets the turn (caller holds the lock)."""
        start = self._order.index(member)
        for step in range(1, len(self._order) + 1):
            candidate = self._order[(start + step) % len(self._order)]
            if candidate in self._active:
                self._holder = candidate
                break
        self._changed.notify_all()
