"""The write-ahead log judged in pure Python as SQLite reads it: a torn tail is dropped, damage before it refused."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora_server.store.wal import FRAME_HEADER_BYTES, HEADER_BYTES, WalDamage, committed_image, read_wal

ROWS = 40


@pytest.fixture
def live(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A database in WAL mode whose every transaction is still in its log (as a kill -9 leaves it)."""
    db = sqlite3.connect(tmp_path / "live.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (n INTEGER, pad BLOB)")
    for n in range(ROWS):
        db.execute("INSERT INTO t VALUES (?, ?)", (n, bytes(700)))
    yield db
    db.close()


def _files(tmp_path: Path) -> tuple[bytes, bytes]:
    return (tmp_path / "live.db").read_bytes(), (tmp_path / "live.db-wal").read_bytes()


def _rows(database: bytes) -> list[int]:
    image = bytearray(database)
    image[18:20] = b"\x01\x01"
    db = sqlite3.connect(":memory:")
    db.deserialize(bytes(image))
    try:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
        return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]
    finally:
        db.close()


def test_applying_the_log_gives_what_sqlite_itself_reads(tmp_path: Path, live: sqlite3.Connection) -> None:
    database, log = _files(tmp_path)

    image = committed_image(database, read_wal(log))

    assert _rows(image) == [n for (n,) in live.execute("SELECT n FROM t ORDER BY n")] == list(range(ROWS))


def test_a_torn_tail_is_dropped_back_to_the_last_whole_commit(tmp_path: Path, live: sqlite3.Connection) -> None:
    database, log = _files(tmp_path)

    torn = read_wal(log[:-100])

    assert _rows(committed_image(database, torn)) == list(range(ROWS - 1))


def test_garbage_before_the_last_frame_of_the_log_is_refused_naming_the_frame(
    tmp_path: Path, live: sqlite3.Connection
) -> None:
    _, log = _files(tmp_path)
    page = read_wal(log).page_size
    damaged = bytearray(log)
    third_page = HEADER_BYTES + 2 * (FRAME_HEADER_BYTES + page) + FRAME_HEADER_BYTES
    damaged[third_page + 10 : third_page + 20] = b"\xee" * 10

    with pytest.raises(WalDamage, match=r"frame 3 of \d+ is damaged but frame 4 after it belongs to the log"):
        read_wal(bytes(damaged))


def test_a_damaged_header_is_refused_when_frames_follow_it(tmp_path: Path, live: sqlite3.Connection) -> None:
    _, log = _files(tmp_path)
    damaged = bytes(8) + log[8:]

    with pytest.raises(WalDamage, match="the log header is damaged"):
        read_wal(damaged)
    assert read_wal(damaged[:HEADER_BYTES]).database_pages == 0  # a header alone holds nothing to lose
    assert read_wal(log[:20]).database_pages == 0  # nor does a header torn on the log's first write


def test_frames_an_earlier_log_left_past_the_restarted_one_are_not_damage(
    tmp_path: Path, live: sqlite3.Connection
) -> None:
    # Prepare: checkpoint and restart the log, then write less than it held: the old frames stay past the new end.
    _, earlier = _files(tmp_path)
    live.execute("PRAGMA wal_checkpoint(RESTART)")
    live.execute("INSERT INTO t VALUES (?, ?)", (ROWS, b""))
    database, log = _files(tmp_path)
    page = read_wal(log).page_size
    assert log[16:24] != earlier[16:24]  # new salts: a restarted log
    assert len(log) > HEADER_BYTES + 10 * (FRAME_HEADER_BYTES + page)

    # Execute
    image = committed_image(database, read_wal(log))

    # Assert
    assert _rows(image) == list(range(ROWS + 1))
