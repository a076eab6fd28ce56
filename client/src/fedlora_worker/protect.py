"""The protection pipeline: what happens to an update between training and the wire.

clip -> weight -> quantize -> noise -> mask, each step a pure function over numpy vectors with its
randomness or keys passed in, so nothing unprotected reaches the transport. Plain aggregation
ships the clipped float delta. Secure aggregation runs every step: `encode` (clip to quantize and
noise, with the weight appended as one more coordinate) once training is done, and `mask` once the
round's survivors and their keys are known.

Two sources of randomness, on purpose different. Stochastic rounding draws from
`rounding_generator(run seed, round, worker)`, so a retried attempt of a round reproduces the
same quantized update bit for bit. Distributed-DP noise draws from `noise_generator()`, seeded by
the operating system: whoever could predict it could subtract it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlora_common.blocks import BlockGroups, site_weights
from fedlora_common.privacy import add_integer_noise, skellam_noise
from fedlora_common.secagg import SecAggParams, mask_vector, quantize

__all__ = [
    "MaskSeeds",
    "Weighted",
    "clip",
    "clip_l2",
    "encode",
    "mask",
    "noise",
    "noise_generator",
    "rounding_generator",
    "weight",
]

Vector = npt.NDArray[np.float32]
Ring = npt.NDArray[np.uint32]
"""Elements of Z_2^32, the ring quantized, noised and masked updates live in."""


@dataclass(frozen=True)
class Weighted:
    """An update scaled by weight / max_examples; the weight travels beside it, masked like the rest."""

    vector: Vector
    weight: int


@dataclass(frozen=True)
class MaskSeeds:
    """This worker's self-mask seed and its (seed, sign) pair with each surviving peer, from the session."""

    self_seed: bytes
    pairwise: Sequence[tuple[bytes, int]]


def clip_l2(vector: Vector, bound: float) -> Vector:
    """Scale vector down to L2 norm `bound` if it is longer; bound <= 0 means unbounded."""
    if bound <= 0:
        return vector
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm <= bound:
        return vector
    return (vector * np.float32(bound / norm)).astype(np.float32)


def clip(delta: Vector, bound: float) -> Vector:
    """Step 1: refuse a diverged update (it must never leave the site), then bound its L2 norm."""
    if not np.isfinite(delta).all():
        raise ValueError("the local update holds NaN or Inf; training diverged")
    return clip_l2(delta, bound)


def weight(update: Vector, *, examples: int, max_examples: int) -> Weighted:
    """Step 2: scale by w / max_examples, w = min(examples, max_examples), so the masked sum is weighted.

    The cap keeps every scaled coordinate inside the quantization range; the coordinator divides
    the sum by sum(w) / max_examples.
    """
    if examples < 1 or max_examples < 1:
        raise ValueError(f"examples and max_examples must be positive, got {examples} and {max_examples}")
    capped = min(examples, max_examples)
    return Weighted((update * np.float32(capped / max_examples)).astype(np.float32), capped)


def noise(quantized: Ring, *, variance: float, rng: np.random.Generator) -> Ring:
    """Step 4: add Skellam noise of the given variance in Z_2^32 (distributed DP); variance 0 adds none."""
    if variance == 0:
        return quantized
    return add_integer_noise(quantized, skellam_noise(quantized.size, variance=variance, rng=rng))


def mask(encoded: Ring, seeds: MaskSeeds) -> Ring:
    """Step 5: add the self mask and the pairwise masks; only the survivors' sum unmasks."""
    return mask_vector(encoded, self_seed=seeds.self_seed, pairwise=seeds.pairwise)


def encode(
    delta: Vector,
    *,
    clip_norm: float,
    examples: int,
    params: SecAggParams,
    rounding: np.random.Generator,
    noise_rng: np.random.Generator,
    groups: BlockGroups | None = None,
    site_rank: int = 0,
) -> Ring:
    """Steps 1 to 4 for secure aggregation: clip, weight, quantize (step 3), noise; the weight appended last, once
    per block group (`groups`, hetlora: the weight where this site trained its `site_rank` ranks, 0 elsewhere)."""
    weighted = weight(clip(delta, clip_norm), examples=examples, max_examples=params.max_examples)
    quantized = quantize(weighted.vector, clip=params.clip_range, bits=params.bits, rng=rounding)
    noised = noise(quantized, variance=params.noise_variance, rng=noise_rng)
    if groups is None or groups.count == 1:
        return np.concatenate([noised, np.array([weighted.weight], dtype=np.uint32)])
    weights = site_weights(groups, site_rank=site_rank, weight=weighted.weight)
    return np.concatenate([noised, weights.astype(np.uint32)])


def rounding_generator(run_seed: int, round_: int, worker_id: str) -> np.random.Generator:
    """Stochastic rounding's draws: fixed by run, round and worker, never by the attempt.

    A retried attempt then sends the same quantized update, and distinct workers round independently.
    """
    worker = int.from_bytes(hashlib.sha256(worker_id.encode()).digest(), "big")
    return np.random.default_rng([run_seed, round_, worker])


def noise_generator() -> np.random.Generator:
    """A generator seeded from the OS for DP noise: nothing the coordinator knows may predict it."""
    return np.random.default_rng(secrets.randbits(128))
