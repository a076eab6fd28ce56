import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlora_common.secagg import dequantize_sum, max_bits, quantization_step, quantize


def _signed(q: np.ndarray) -> np.ndarray:
    return q.view(np.int32).astype(np.int64)


def test_stochastic_rounding_is_unbiased() -> None:
    """The mean of K quantizations is within 6 standard errors of x, coordinate by coordinate.

    One coordinate's rounding error is step * (Bernoulli(f) - f), whose standard deviation is at
    most step / 2, so the mean of K draws errs by more than 6 * step / (2 sqrt K) with probability
    about 2e-9 per coordinate. 4 bits make the step coarse: rounding to nearest would miss by up to
    step / 2, far outside this tolerance.
    """
    clip, bits, samples = 1.0, 4, 4000
    x = np.linspace(-clip, clip, 97, dtype=np.float32)
    rng = np.random.default_rng(20251125)
    step = quantization_step(clip, bits)

    total = np.zeros(x.size, dtype=np.float64)
    for _ in range(samples):
        total += dequantize_sum(quantize(x, clip=clip, bits=bits, rng=rng), clip=clip, bits=bits)
    mean = total / samples

    tolerance = 6 * (step / 2) / math.sqrt(samples)
    assert np.max(np.abs(mean - x.astype(np.float64))) <= tolerance


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    clip=st.floats(1e-3, 1e3),
    bits=st.integers(2, 31),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_value_is_off_by_at_most_one_step(data: st.DataObject, clip: float, bits: int, seed: int) -> None:
    c = float(np.float32(clip))
    if c > clip:  # the float32 nearest the clip may lie just beyond it
        c = float(np.nextafter(np.float32(clip), np.float32(0)))
    x = data.draw(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-c, c, width=32)))
    step = quantization_step(clip, bits)

    back = dequantize_sum(quantize(x, clip=clip, bits=bits, rng=np.random.default_rng(seed)), clip=clip, bits=bits)

    # The error is below one level; 1e-12 absorbs float64 rounding of the scale, nothing more.
    assert np.all(np.abs(back - x.astype(np.float64)) <= step * (1 + 1e-12))


@pytest.mark.parametrize("bits", [2, 8, 16, 31])
def test_values_beyond_the_clip_are_clamped(bits: int) -> None:
    x = np.array([-1e30, -np.inf, -3.0, 3.0, np.inf, 1e30], dtype=np.float32)
    levels = 2 ** (bits - 1) - 1

    q = quantize(x, clip=2.0, bits=bits, rng=np.random.default_rng(0))

    assert _signed(q).tolist() == [-levels, -levels, -levels, levels, levels, levels]
    np.testing.assert_allclose(dequantize_sum(q, clip=2.0, bits=bits), [-2, -2, -2, 2, 2, 2], rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 1000), sign=st.sampled_from([-1, 1]))
def test_a_sum_of_n_vectors_at_the_clip_never_wraps(n: int, sign: int) -> None:
    bits = max_bits(n)
    one = quantize(np.array([sign * 1.0], dtype=np.float32), clip=1.0, bits=bits, rng=np.random.default_rng(n))

    total = np.repeat(one, n).sum(dtype=np.uint32)  # wraps mod 2**32, as the coordinator's sum does

    assert bits == 31 - math.ceil(math.log2(n))
    assert _signed(np.array([total], dtype=np.uint32))[0] == sign * n * (2 ** (bits - 1) - 1)
    assert dequantize_sum(np.array([total], dtype=np.uint32), clip=1.0, bits=bits)[0] == pytest.approx(sign * n)


def test_max_bits_is_the_largest_that_fits() -> None:
    assert [max_bits(n) for n in (1, 2, 3, 4, 5, 8, 9, 100, 1000)] == [31, 30, 29, 29, 28, 28, 27, 24, 21]
    with pytest.raises(ValueError, match="at least one worker"):
        max_bits(0)


def test_quantization_is_deterministic_given_the_generator_seed() -> None:
    x = np.random.default_rng(1).uniform(-1, 1, 1000).astype(np.float32)

    first = quantize(x, clip=1.0, bits=16, rng=np.random.default_rng(42))
    second = quantize(x, clip=1.0, bits=16, rng=np.random.default_rng(42))
    other = quantize(x, clip=1.0, bits=16, rng=np.random.default_rng(43))

    assert first.dtype == np.uint32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_negative_values_are_twos_complement_in_uint32() -> None:
    x = np.array([-1.0, 0.0, 1.0], dtype=np.float32)

    q = quantize(x, clip=1.0, bits=8, rng=np.random.default_rng(0))

    assert q.tolist() == [2**32 - 127, 0, 127]


@pytest.mark.parametrize(("clip", "bits"), [(0.0, 8), (-1.0, 8), (float("nan"), 8), (1.0, 1), (1.0, 32)])
def test_invalid_parameters_are_refused(clip: float, bits: int) -> None:
    with pytest.raises(ValueError, match=r"clip|bits"):
        quantize(np.zeros(3, dtype=np.float32), clip=clip, bits=bits, rng=np.random.default_rng(0))


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan], dtype=np.float32), clip=1.0, bits=8, rng=np.random.default_rng(0))
