import hashlib

from hypothesis import given
from hypothesis import strategies as st

from fedlora_common.chunking import chunk_count, iter_chunks, sha256


@given(payload=st.binary(max_size=5000), chunk=st.integers(min_value=1, max_value=700))
def test_chunks_reassemble_to_the_payload_in_the_announced_count(payload: bytes, chunk: int) -> None:
    pieces = list(iter_chunks(payload, chunk))

    assert b"".join(bytes(p) for p in pieces) == payload
    assert len(pieces) == chunk_count(len(payload), chunk)
    assert all(len(p) == chunk for p in pieces[:-1])


def test_chunks_are_views_not_copies() -> None:
    payload = bytearray(b"abcdefgh")

    first = next(iter_chunks(payload, 4))
    payload[0] = ord("z")

    assert bytes(first) == b"zbcd"


def test_sha256_matches_hashlib() -> None:
    assert sha256(b"fedlora") == hashlib.sha256(b"fedlora").digest()
