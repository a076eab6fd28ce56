"""A TCP proxy on loopback that delays, stalls and cuts the connections it carries: the network as it fails.

    with FaultyProxy(("127.0.0.1", server_port)) as proxy:
        client = CoordinatorClient(target=proxy.target, ...)
        proxy.cut_after("up", 40_000)          # the next 40 kB towards the server pass, then the connection dies
        proxy.stall("down", 1.5)               # nothing reaches the client for 1.5 s
        proxy.stall("up", 1.5, after=40_000)   # ... once 40 kB more have gone up
        proxy.delay(0.005)                     # every block waits 5 ms

It listens on port 0 and stops by itself after `lifetime_s` (or when the `with` block ends):
threads, sockets and all. "up" is client -> server, "down" server -> client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

__all__ = ["Direction", "FaultyProxy"]

Direction = Literal["up", "down"]
BLOCK = 16 * 1024


@dataclass
class _Rules:
    delay_s: float = 0.0
    stall_until: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    cut_left: dict[str, int | None] = field(default_factory=lambda: {"up": None, "down": None})
    stall_left: dict[str, tuple[int, float] | None] = field(default_factory=lambda: {"up": None, "down": None})


class FaultyProxy:
    def __init__(self, upstream: tuple[str, int], *, lifetime_s: float = 120.0) -> None:
        self._upstream = upstream
        self._lifetime_s = lifetime_s
        self._rules = _Rules()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.cuts = 0
        self.connections = 0
        self.forwarded: dict[str, int] = {"up": 0, "down": 0}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- faults -----------------------------------------------------------------------

    def retarget(self, upstream: tuple[str, int]) -> None:
        """Send new connections to another upstream (a coordinator restarted on another port)."""
        with self._lock:
            self._upstream = upstream

    def clear(self) -> None:
        """No more faults: no delay, no stall, no cut waiting."""
        with self._lock:
            self._rules = _Rules()

    def delay(self, seconds: float) -> None:
        """Hold every forwarded block this long (0 ends the delay)."""
        with self._lock:
            self._rules.delay_s = seconds

    def stall(self, direction: Direction, seconds: float, *, after: int = 0) -> None:
        """Forward nothing in `direction` for `seconds` (once `after` more bytes passed); the rest follows then."""
        with self._lock:
            if after:
                self._rules.stall_left[direction] = (after, seconds)
            else:
                self._rules.stall_until[direction] = time.monotonic() + seconds

    def cut_after(self, direction: Direction, nbytes: int) -> None:
        """Let `nbytes` more pass in `direction`, then close that connection from both ends (once)."""
        with self._lock:
            self._rules.cut_left[direction] = nbytes

    def drop(self) -> None:
        """Close every connection now: what the proxy still holds never arrives (the sending host died with it)."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _close(sock)

    def armed(self) -> bool:
        """Whether a cut is still waiting for its bytes."""
        with self._lock:
            rules = (*self._rules.cut_left.values(), *self._rules.stall_left.values())
            return any(left is not None for left in rules)

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> FaultyProxy:
        accept = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; safe to call twice."""
        self._stopping.set()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _close(sock)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- forwarding -------------------------------------------------------------------

    def _accept(self) -> None:
        ends_at = time.monotonic() + self._lifetime_s
        while not self._stopping.is_set():
            if time.monotonic() > ends_at:
                self._stopping.set()
                break
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                upstream = self._upstream
            try:
                server = socket.create_connection(upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open |= {client, server}
                self.connections += 1
            pair = (client, server)
            for direction, src, dst in (("up", client, server), ("down", server, client)):
                pump = threading.Thread(target=self._pump, args=(direction, src, dst, pair), daemon=True)
                pump.start()
                self._threads.append(pump)
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _close(sock)

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...]) -> None:
        try:
            while not self._stopping.is_set():
                data = src.recv(BLOCK)
                if not data:
                    break
                while time.monotonic() < self._rules.stall_until[direction] and not self._stopping.is_set():
                    time.sleep(0.01)
                if self._rules.delay_s:
                    time.sleep(self._rules.delay_s)
                data, cut = self._take(direction, data)
                if data:
                    dst.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            for sock in pair:
                _close(sock)
            with self._lock:
                self._open -= set(pair)

    def _take(self, direction: str, data: bytes) -> tuple[bytes, bool]:
        """What of `data` passes, and whether the connection is cut after it."""
        with self._lock:
            self.forwarded[direction] += len(data)
            stall = self._rules.stall_left[direction]
            if stall is not None:
                if len(data) < stall[0]:
                    self._rules.stall_left[direction] = (stall[0] - len(data), stall[1])
                else:  # this block goes, what follows waits
                    self._rules.stall_left[direction] = None
                    self._rules.stall_until[direction] = time.monotonic() + stall[1]
            left = self._rules.cut_left[direction]
            if left is None or len(data) < left:
                if left is not None:
                    self._rules.cut_left[direction] = left - len(data)
                return data, False
            self._rules.cut_left[direction] = None
            self.cuts += 1
            return data[:left], True


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
