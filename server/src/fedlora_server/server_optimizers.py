"""Server optimizers over a round's mean update, as pure functions (Reddi et al. 2021, Algorithm 2).

The mean update Δ is a pseudo-gradient pointing downhill, so each optimizer steps along it (+).
Moments are float64 so a resumed run, which reads them back exactly, repeats every step bit for bit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Moment", "adam_second_moment", "adaptive_step", "first_moment", "momentum", "yogi_second_moment"]

Moment = npt.NDArray[np.float64]


def momentum(m: Moment, delta: npt.NDArray[np.float32], *, beta1: float) -> Moment:
    """FedAvgM: m = β1 m + Δ (the step is then η m)."""
    return beta1 * m + delta.astype(np.float64)


def first_moment(m: Moment, delta: npt.NDArray[np.float32], *, beta1: float) -> Moment:
    """FedAdam, FedYogi: m = β1 m + (1 - β1) Δ."""
    return beta1 * m + (1.0 - beta1) * delta.astype(np.float64)


def adam_second_moment(v: Moment, delta: npt.NDArray[np.float32], *, beta2: float) -> Moment:
    """FedAdam: v = β2 v + (1 - β2) Δ²."""
    return beta2 * v + (1.0 - beta2) * np.square(delta.astype(np.float64))


def yogi_second_moment(v: Moment, delta: npt.NDArray[np.float32], *, beta2: float) -> Moment:
    """FedYogi: v = v - (1 - β2) Δ² sign(v - Δ²); v changes additively, so it forgets a large Δ more slowly."""
    squared = np.square(delta.astype(np.float64))
    return v - (1.0 - beta2) * squared * np.sign(v - squared)


def adaptive_step(m: Moment, v: Moment, *, lr: float, tau: float) -> Moment:
    """FedAdam, FedYogi: η m / (√v + τ); τ bounds the step where v is small."""
    return lr * m / (np.sqrt(v) + tau)
