"""The SQLite write-ahead log read as https://www.sqlite.org/fileformat2.html#walformat documents it.

Pure functions over bytes, so the coordinator can judge a log before SQLite opens it: SQLite reads
frames up to the first one whose salts or checksum fail and drops the rest for good (rightly, for
the torn tail a crash leaves), and a log whose header fails is dropped whole. Frames of this log
found past a failing one mean the damage is in the middle: committed transactions would be lost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["WalDamage", "WalLog", "committed_image", "read_wal", "wal_checksum"]

MAGIC_LITTLE_ENDIAN = 0x377F0682
MAGIC_BIG_ENDIAN = 0x377F0683
FORMAT_VERSION = 3007000
HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24


class WalDamage(ValueError):
    """The log cannot be applied as SQLite would without losing committed transactions; the message says where."""


@dataclass(frozen=True)
class WalLog:
    """What a reader of the database sees from the log: the pages of its committed transactions."""

    page_size: int = 0
    database_pages: int = 0
    """The database's size in pages after the last committed transaction; 0 when the log commits none."""
    pages: dict[int, bytes] = field(default_factory=dict)
    """Page number -> content, as of the last committed transaction."""


def wal_checksum(data: bytes, seed: tuple[int, int], *, big_endian: bool) -> tuple[int, int]:
    """The log's running checksum over `data` (a multiple of 8 bytes), continuing from `seed`."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0, s1 = seed
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def read_wal(data: bytes) -> WalLog:
    """The committed pages of a log; WalDamage if its header or a frame before its tail is damaged."""
    if len(data) < HEADER_BYTES:
        return WalLog()  # a header torn while the log was first written: it never held a frame
    magic, version, page_size, _, salt1, salt2, sum1, sum2 = struct.unpack(">8I", data[:HEADER_BYTES])
    big_endian = magic == MAGIC_BIG_ENDIAN
    frame_bytes = FRAME_HEADER_BYTES + page_size
    frames = (len(data) - HEADER_BYTES) // frame_bytes if page_size else 0
    header_fault = _header_fault(magic, version, page_size)
    if header_fault is None and wal_checksum(data[:24], (0, 0), big_endian=big_endian) != (sum1, sum2):
        header_fault = "its checksum does not match"
    if header_fault is not None:
        if len(data) > HEADER_BYTES:
            raise WalDamage(f"the log header is damaged ({header_fault}): SQLite would drop every frame after it")
        return WalLog()
    checksum = (sum1, sum2)
    committed: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    database_pages = 0
    for index in range(frames):
        start = HEADER_BYTES + index * frame_bytes
        number, commit_size, frame_salt1, frame_salt2, frame_sum1, frame_sum2 = struct.unpack(
            ">6I", data[start : start + FRAME_HEADER_BYTES]
        )
        page = data[start + FRAME_HEADER_BYTES : start + frame_bytes]
        checksum = wal_checksum(data[start : start + 8] + page, checksum, big_endian=big_endian)
        if number == 0 or (frame_salt1, frame_salt2) != (salt1, salt2) or checksum != (frame_sum1, frame_sum2):
            _refuse_frames_past(data, index + 1, frames, frame_bytes, (salt1, salt2), failed=index)
            break
        pending[number] = page
        if commit_size:
            committed.update(pending)
            pending.clear()
            database_pages = commit_size
    return WalLog(page_size, database_pages, committed)


def _header_fault(magic: int, version: int, page_size: int) -> str | None:
    if magic not in (MAGIC_LITTLE_ENDIAN, MAGIC_BIG_ENDIAN):
        return f"magic {magic:#010x}"
    if version != FORMAT_VERSION:
        return f"format version {version}"
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"page size {page_size}"
    return None


def _refuse_frames_past(
    data: bytes, first: int, frames: int, frame_bytes: int, salts: tuple[int, int], *, failed: int
) -> None:
    """A frame of this log (its salts) past the one that failed: the failure is not a torn tail."""
    for index in range(first, frames):
        start = HEADER_BYTES + index * frame_bytes
        if struct.unpack(">2I", data[start + 8 : start + 16]) == salts:
            raise WalDamage(
                f"frame {failed + 1} of {frames} is damaged but frame {index + 1} after it belongs to the log: "
                "SQLite would drop the committed transactions from there on"
            )


def committed_image(database: bytes, log: WalLog) -> bytes:
    """The database file as a reader sees it: `database` with the log's committed pages applied."""
    if not log.database_pages:
        return database
    size = log.database_pages * log.page_size
    image = bytearray(database[:size].ljust(size, b"\0"))
    for number, page in log.pages.items():
        if number <= log.database_pages:
            image[(number - 1) * log.page_size : number * log.page_size] = page
    return bytes(image)
