"""Unbiased stochastic quantization of a clipped vector into Z_2^32, sized so n of them cannot wrap."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["dequantize_sum", "max_bits", "quantization_step", "quantize"]


def max_bits(n_workers: int) -> int:
    """The largest b with b <= 32 - ceil(log2 n) - 1: n signed b-bit values sum inside int32."""
    if n_workers < 1:
        raise ValueError("at least one worker")
    return 32 - (n_workers - 1).bit_length() - 1


def _levels(bits: int) -> int:
    if not 2 <= bits <= 31:
        raise ValueError(f"bits must lie in [2, 31], got {bits}")
    return (1 << (bits - 1)) - 1


def quantization_step(clip: float, bits: int) -> float:
    return clip / _levels(bits)


def quantize(
    values: npt.NDArray[np.float32], *, clip: float, bits: int, rng: np.random.Generator
) -> npt.NDArray[np.uint32]:
    """Clamp to [-clip, clip], scale to integers with unbiased stochastic rounding, two's complement in uint32."""
    if clip <= 0:
        raise ValueError("clip must be positive")
    scaled = np.clip(values.astype(np.float64), -clip, clip) * (_levels(bits) / clip)
    floor = np.floor(scaled)
    rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
    return rounded.astype(np.int64).astype(np.uint32)


def dequantize_sum(total: npt.NDArray[np.uint32], *, clip: float, bits: int) -> npt.NDArray[np.float64]:
    """A sum (mod 2**32) of quantized vectors, read as signed int32 and scaled back."""
    return total.view(np.int32).astype(np.float64) * quantization_step(clip, bits)
