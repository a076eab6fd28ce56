import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_common.secagg import keystream_u32, mask_vector, pairwise_sign, unmask_sum

seeds = st.binary(min_size=32, max_size=32)


def _sum(vectors: list[np.ndarray]) -> npt.NDArray[np.uint32]:
    """Coordinate-wise sum in Z_2^32, wrapping as the coordinator's does."""
    total = np.zeros(vectors[0].size, dtype=np.uint32)
    for vector in vectors:
        total += vector
    return total


def _federation(n: int, numel: int, seed: int) -> tuple[list[np.ndarray], list[bytes], dict[frozenset[int], bytes]]:
    """Plain uint32 vectors, self seeds and one shared seed per pair (test data, so numpy may draw it)."""
    rng = np.random.default_rng(seed)
    plain = [rng.integers(0, 2**32, numel, dtype=np.uint32) for _ in range(n)]
    self_seeds = [rng.bytes(32) for _ in range(n)]
    pair_seeds = {frozenset((i, j)): rng.bytes(32) for i in range(n) for j in range(i + 1, n)}
    return plain, self_seeds, pair_seeds


def _masked(i: int, n: int, plain: np.ndarray, self_seed: bytes, pair_seeds: dict[frozenset[int], bytes]) -> np.ndarray:
    pairwise = [(pair_seeds[frozenset((i, j))], pairwise_sign(i, j)) for j in range(n) if j != i]
    return mask_vector(plain, self_seed=self_seed, pairwise=pairwise)


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([3, 5, 10]), numel=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_pairwise_masks_cancel_exactly_in_the_sum(n: int, numel: int, seed: int) -> None:
    plain, self_seeds, pair_seeds = _federation(n, numel, seed)
    masked = [_masked(i, n, plain[i], self_seeds[i], pair_seeds) for i in range(n)]
    total = _sum(masked)

    unmasked = unmask_sum(total, self_seeds=self_seeds, dropped_pairwise=[])

    np.testing.assert_array_equal(unmasked, _sum(plain))
    assert not any(np.array_equal(m, p) for m, p in zip(masked, plain, strict=True))


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([3, 5, 10]), numel=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_the_survivors_sum_is_recovered_after_dropouts(n: int, numel: int, seed: int, data: st.DataObject) -> None:
    plain, self_seeds, pair_seeds = _federation(n, numel, seed)
    masked = [_masked(i, n, plain[i], self_seeds[i], pair_seeds) for i in range(n)]
    dropped = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
    survivors = [i for i in range(n) if i not in dropped]
    total = _sum([masked[i] for i in survivors])

    unmasked = unmask_sum(
        total,
        self_seeds=[self_seeds[i] for i in survivors],
        dropped_pairwise=[(pair_seeds[frozenset((i, j))], pairwise_sign(i, j)) for i in survivors for j in dropped],
    )

    np.testing.assert_array_equal(unmasked, _sum([plain[i] for i in survivors]))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, offset=st.integers(0, 5000), count=st.integers(0, 3000))
def test_a_keystream_slice_equals_the_slice_of_the_whole_stream(seed: bytes, offset: int, count: int) -> None:
    whole = keystream_u32(seed, offset + count)

    part = keystream_u32(seed, count, offset=offset)

    np.testing.assert_array_equal(part, whole[offset:])


@pytest.mark.parametrize("offset", [0, 1, 3, 2**16 - 1, 2**18 + 5])
def test_slices_across_internal_chunk_boundaries_agree(offset: int) -> None:
    seed = bytes(range(32))
    whole = keystream_u32(seed, offset + 2**17 + 7)

    part = keystream_u32(seed, 2**17 + 7, offset=offset)

    np.testing.assert_array_equal(part, whole[offset:])


def test_keystream_is_aes256_ctr_from_the_zero_block_read_little_endian() -> None:
    """Pins the PRG both sides must agree on, independently of how it is generated."""
    seed = bytes(range(100, 132))
    reference = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * 1000))

    stream = keystream_u32(seed, 1000)

    assert stream.dtype == np.uint32
    np.testing.assert_array_equal(stream, np.frombuffer(reference, dtype="<u4"))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), numel=st.integers(1, 2000), chunk=st.integers(1, 700))
def test_masking_chunk_by_chunk_equals_masking_the_whole_vector(seed: int, numel: int, chunk: int) -> None:
    plain, self_seeds, pair_seeds = _federation(3, numel, seed)
    pairwise = [(pair_seeds[frozenset((0, 1))], 1), (pair_seeds[frozenset((0, 2))], 1)]
    whole = mask_vector(plain[0], self_seed=self_seeds[0], pairwise=pairwise)

    chunks = [
        mask_vector(plain[0][start : start + chunk], self_seed=self_seeds[0], pairwise=pairwise, offset=start)
        for start in range(0, numel, chunk)
    ]

    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_a_masked_vector_costs_the_same_bytes_as_the_float32_delta() -> None:
    """uint32 coordinates in Z_2^32: on the wire a masked update is no bigger than the float32 delta."""
    delta = np.zeros(12345, dtype=np.float32)
    quantized = np.zeros(delta.size, dtype=np.uint32)

    masked = mask_vector(quantized, self_seed=bytes(32), pairwise=[(b"\1" * 32, -1)])

    assert masked.dtype == np.uint32
    assert len(masked.tobytes()) == len(delta.tobytes()) == 4 * 12345


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_a_seed_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keystream_u32(bytes(length), 10)
    with pytest.raises(ValueError, match="32 bytes"):
        mask_vector(np.zeros(4, dtype=np.uint32), self_seed=bytes(32), pairwise=[(bytes(length), 1)])


def test_only_uint32_vectors_and_unit_signs_are_masked() -> None:
    with pytest.raises(ValueError, match="uint32"):
        mask_vector(np.zeros(4, dtype=np.float32), self_seed=bytes(32), pairwise=[])
    with pytest.raises(ValueError, match="sign"):
        mask_vector(np.zeros(4, dtype=np.uint32), self_seed=bytes(32), pairwise=[(bytes(32), 2)])


def test_pairwise_signs_are_opposite_and_self_pairs_refused() -> None:
    assert (pairwise_sign(1, 2), pairwise_sign(2, 1)) == (1, -1)
    with pytest.raises(ValueError, match="oneself"):
        pairwise_sign(3, 3)


def test_masking_leaves_the_input_untouched() -> None:
    values = np.arange(10, dtype=np.uint32)

    mask_vector(values, self_seed=bytes(32), pairwise=[(b"\2" * 32, 1)])

    np.testing.assert_array_equal(values, np.arange(10, dtype=np.uint32))


def test_a_long_vector_gets_exactly_the_keystreams_added() -> None:
    """Longer than the internal chunk, at an odd offset: the result is values + self - pair, mod 2**32."""
    numel, offset = 2**17 + 3, 5
    values = np.random.default_rng(7).integers(0, 2**32, numel, dtype=np.uint32)
    self_seed, pair_seed = b"\3" * 32, b"\4" * 32

    masked = mask_vector(values, self_seed=self_seed, pairwise=[(pair_seed, -1)], offset=offset)

    expected = values + keystream_u32(self_seed, numel, offset=offset) - keystream_u32(pair_seed, numel, offset=offset)
    np.testing.assert_array_equal(masked, expected)
