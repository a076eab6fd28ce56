"""A raw HTTP/2 client of a gRPC server, frame by frame: it sends what no gRPC client would.

A gRPC call is an HTTP/2 stream: HEADERS (method, metadata), then DATA holding length-prefixed
messages (1 byte "compressed", 4 bytes big-endian length, the bytes). `RawConnection.call` opens
one and may stop anywhere, e.g. after 10 of the 100,000 bytes its prefix declares, without ending
the stream: a half-sent request. Streams are opened at once, before the server's SETTINGS are
read, as a client that ignores the server's limits would.

    with RawConnection(port) as raw:
        streams = [raw.call("/pkg.Service/Method", declared=100_000, body=b"x" * 10) for _ in range(100)]
        statuses = raw.statuses(streams, timeout_s=5)   # stream id -> grpc-status, or a reset's name
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["RawConnection", "frame"]


def frame(message: bytes, *, declared: int | None = None) -> bytes:
    """The length prefix of a gRPC message declaring `declared` bytes (default: its own length), then the message."""
    return struct.pack(">?I", False, len(message) if declared is None else declared) + message


class RawConnection:
    """One TCP connection to 127.0.0.1:port; `close()` (or leaving the `with`) hangs up."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._port = port
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._h2.initiate_connection()
        self._socket.sendall(self._h2.data_to_send())
        self._ended: dict[int, str] = {}
        self.closed = False
        """Whether the server hung up (or said GOAWAY): streams it had not ended by then never will be."""

    def call(
        self,
        method: str,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        declared: int | None = None,
        end: bool = False,
    ) -> int:
        """Open a call, send one message prefix declaring `declared` bytes and then `body`; the stream's id.

        The stream stays open (a request still coming) unless `end`."""
        stream = self._h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"127.0.0.1:{self._port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self._h2.send_headers(stream, headers)
        self._h2.send_data(stream, frame(body, declared=declared), end_stream=end)
        self._socket.sendall(self._h2.data_to_send())
        return stream

    def statuses(self, streams: Iterable[int], *, timeout_s: float, at_least: int | None = None) -> dict[int, str]:
        """How the streams ended, read until `at_least` of them (default: all) have or `timeout_s` has passed: each
        one's grpc-status code (e.g. "16" for UNAUTHENTICATED), or "reset <error code>"; those still open are left out."""
        wanted = set(streams)
        enough = len(wanted) if at_least is None else at_least
        deadline = time.monotonic() + timeout_s
        while len(wanted & self._ended.keys()) < enough and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._socket.settimeout(left)
            try:
                data = self._socket.recv(65_536)
            except TimeoutError:
                break
            if not data:
                self.closed = True
                break
            self._receive(data)
        return {s: self._ended[s] for s in wanted if s in self._ended}

    def _receive(self, data: bytes) -> None:
        for event in self._h2.receive_data(data):
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                status = dict(event.headers or []).get("grpc-status")
                if status is not None:  # a trailers-only answer carries it in its one HEADERS frame
                    self._ended.setdefault(event.stream_id, str(status))
            elif isinstance(event, h2.events.StreamReset):
                self._ended.setdefault(event.stream_id, f"reset {getattr(event.error_code, 'name', event.error_code)}")
            elif isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
        self._socket.sendall(self._h2.data_to_send())

    def close(self) -> None:
        try:
            self._h2.close_connection()
            self._socket.sendall(self._h2.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass  # the server may already have hung up
        self._socket.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
