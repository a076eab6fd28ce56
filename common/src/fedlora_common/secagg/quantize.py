"""Unbiased stochastic quantization of a clipped vector into Z_2^32, sized so n of them cannot wrap.

Masking works on integers mod 2**32, so a float delta becomes signed integers of `bits` bits
before it is masked. Stochastic rounding keeps the mean unbiased (the aggregate is an
unbiased estimate of the float sum); the rounding draws come from the generator passed in,
which only decides rounding, never a mask.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["dequantize_sum", "max_bits", "quantization_step", "quantize"]


def max_bits(n_workers: int) -> int:
    """The largest b with b <= 32 - ceil(log2 n) - 1: n signed b-bit values then sum inside int32."""
    if n_workers < 1:
        raise ValueError(f"at least one worker, got {n_workers}")
    return 32 - (n_workers - 1).bit_length() - 1  # (n - 1).bit_length() == ceil(log2 n) for n >= 1


_SLICE = 1 << 16


def _levels(bits: int) -> int:
    """The largest magnitude a quantized coordinate takes: 2**(bits-1) - 1 (symmetric, no -2**(bits-1))."""
    if not 2 <= bits <= 31:
        raise ValueError(f"bits must lie in [2, 31], got {bits}")
    return (1 << (bits - 1)) - 1


def _check_clip(clip: float) -> None:
    if not (np.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip}")


def quantization_step(clip: float, bits: int) -> float:
    """The float value of one integer level: the bound on one coordinate's rounding error."""
    _check_clip(clip)
    return clip / _levels(bits)


def quantize(
    values: npt.NDArray[np.float32], *, clip: float, bits: int, rng: np.random.Generator
) -> npt.NDArray[np.uint32]:
    """Clamp to [-clip, clip], scale to +-(2**(bits-1) - 1) with unbiased stochastic rounding, as uint32."""
    _check_clip(clip)
    levels = _levels(bits)
    flat = np.asarray(values).reshape(-1)
    if np.isnan(flat).any():
        raise ValueError("cannot quantize NaN")
    out = np.empty(flat.size, dtype=np.int32)
    # Slices that stay in cache; the generator draws the same stream as one full-size call would.
    for start in range(0, flat.size, _SLICE):
        scaled = flat[start : start + _SLICE].astype(np.float64)
        np.clip(scaled, -clip, clip, out=scaled)
        scaled *= levels / clip
        np.clip(scaled, -levels, levels, out=scaled)  # clip * (levels / clip) may land an ulp past levels
        floor = np.floor(scaled)
        scaled -= floor  # now the fractional part
        # Round up with probability equal to the fractional part: E[rounded] == scaled exactly.
        floor += rng.random(scaled.size) < scaled
        out[start : start + scaled.size] = floor
    return out.view(np.uint32).reshape(np.shape(values))


def dequantize_sum(total: npt.NDArray[np.uint32], *, clip: float, bits: int) -> npt.NDArray[np.float64]:
    """A sum (mod 2**32) of quantized vectors, read as signed int32 and scaled back to floats."""
    step = quantization_step(clip, bits)
    signed = np.ascontiguousarray(total, dtype=np.uint32).view(np.int32)
    return signed.astype(np.float64) * step
