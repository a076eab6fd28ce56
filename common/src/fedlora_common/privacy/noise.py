"""Noise for client-level DP-FedAvg: Gaussian at the coordinator, or Skellam at each worker.

Central placement: the coordinator adds N(0, (z C)^2) to the sum of updates clipped to C; it
sees the noiseless sum first, so the guarantee trusts the coordinator.

Distributed placement (Agarwal et al., NeurIPS 2021): each worker adds integer Skellam noise to
its quantized update before masking, so nobody ever holds the noiseless sum. A sum of independent
Skellam variables is Skellam, and any t survivors together carry the target variance
(z * sensitivity)^2. The quantization is sized so values plus noise do not wrap mod 2^32.
The accountant treats the sum as a Gaussian of the same variance: Agarwal et al. (Thm. 3.5) bound
the Skellam's Renyi divergence by the Gaussian's plus a term of order 1/mu; the Poisson means here are 1e11-1e12.

Noise must be unpredictable to everyone else, so callers pass a generator seeded from the
operating system's entropy, never from the run's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_POISSON_MEAN",
    "DistributedNoise",
    "add_integer_noise",
    "central_noise",
    "plan_distributed_noise",
    "skellam_noise",
]

_INT32_MAX: Final = 2**31 - 1
# numpy's Poisson sampler keeps its variance only up to about this mean (at 1e15 it is 4% off, at
# 1e16 40%); a few million levels are still far finer than the noise itself.
MAX_POISSON_MEAN: Final = 1e12


@dataclass(frozen=True)
class DistributedNoise:
    """How a secure round quantizes and noises updates; every field is public to all participants.

    clip is the update clip norm C, which also bounds every coordinate, so quantization never
    truncates a clipped update. sensitivity is one worker's quantized L2 norm bound in levels:
    C's levels plus sqrt(dimension) for stochastic rounding.
    """

    bits: int
    clip: float
    worker_variance: float
    sensitivity: float


def plan_distributed_noise(
    *,
    participants: int,
    threshold: int,
    noise_multiplier: float,
    clip_norm: float,
    dimension: int,
    tail_sigmas: float = 8.0,
) -> DistributedNoise:
    """The most quantization bits for which n clipped updates plus their noise stay inside int32.

    Each worker adds variance (z * sensitivity)^2 / t, so t survivors reach z exactly and n give
    more. The bound allows `tail_sigmas` standard deviations of the n workers' noise per coordinate,
    and keeps each worker's Poisson means where the sampler is exact.
    """
    if not 2 <= threshold <= participants:
        raise ValueError(f"threshold {threshold} must lie in [2, {participants}]")
    if not (noise_multiplier > 0 and clip_norm > 0 and dimension > 0):
        raise ValueError("noise_multiplier, clip_norm and dimension must be positive")
    rounding = math.sqrt(dimension)
    spread = tail_sigmas * noise_multiplier * math.sqrt(participants / threshold)
    for bits in range(31, 1, -1):
        levels = (1 << (bits - 1)) - 1
        sensitivity = levels + rounding
        variance = (noise_multiplier * sensitivity) ** 2 / threshold
        if participants * levels + spread * sensitivity <= _INT32_MAX and variance / 2 <= MAX_POISSON_MEAN:
            return DistributedNoise(bits, clip_norm, variance, sensitivity)
    raise ValueError(
        f"noise multiplier {noise_multiplier} for {participants} workers leaves no room in 32 bits for the update"
    )


def skellam_noise(size: int, *, variance: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Symmetric Skellam: Poisson(variance/2) - Poisson(variance/2), integer, mean 0, the given variance."""
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    mu = variance / 2
    if mu > MAX_POISSON_MEAN:
        raise ValueError(f"variance {variance:.3g} is beyond the range where the Poisson sampler is exact")
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def add_integer_noise(quantized: npt.NDArray[np.uint32], noise: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """quantized + noise in Z_2^32, the ring masking works in; wrapping is exact and undone by the sum."""
    if quantized.shape != noise.shape:
        raise ValueError(f"noise shape {noise.shape} != update shape {quantized.shape}")
    return quantized + noise.astype(np.uint32)  # int64 -> uint32 keeps the value mod 2^32


def central_noise(size: int, *, std: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Gaussian noise for the coordinator to add to the sum of clipped updates."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return rng.normal(0.0, std, size)
