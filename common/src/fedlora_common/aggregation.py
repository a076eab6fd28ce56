"""Aggregation math on flat float32 vectors: pure functions and one streaming accumulator.

The accumulator is what keeps the coordinator's memory O(model): each update is folded
into one running weighted sum, slice by slice, and never held whole.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedlora_common.manifest import Manifest

__all__ = ["StreamingAccumulator", "apply_update", "weighted_mean"]

Vector = npt.NDArray[np.float32]


def weighted_mean(updates: list[Vector], weights: list[float]) -> Vector:
    """Reference FedAvg: sum_i w_i x_i / sum_i w_i (used by tests and benchmarks)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for x, w in zip(updates, weights, strict=True):
        acc += np.float64(w) * x
    return (acc / total).astype(np.float32)


class StreamingAccumulator:
    """A running example-weighted sum of updates of one fixed length, kept in float64."""

    def __init__(self, numel: int) -> None:
        self._sum = np.zeros(numel, dtype=np.float64)
        self._weight = 0.0
        self._count = 0

    @property
    def numel(self) -> int:
        return int(self._sum.size)

    @property
    def sums(self) -> npt.NDArray[np.float64]:
        """The running weighted sum (read-only view), for means that divide blocks by weights of their own."""
        view = self._sum.view()
        view.flags.writeable = False
        return view

    @property
    def total_weight(self) -> float:
        return self._weight

    @property
    def contributors(self) -> int:
        return self._count

    def add_slice(self, offset: int, values: Vector, weight: float) -> None:
        """Fold values (elements [offset, offset + len)) of one update, scaled by its weight."""
        stop = offset + values.size
        if offset < 0 or stop > self._sum.size:
            raise ValueError(f"slice [{offset}, {stop}) outside an update of {self._sum.size} elements")
        self._sum[offset:stop] += np.float64(weight) * values

    def close_update(self, weight: float) -> None:
        """Count one complete update of this weight into the mean's denominator."""
        if weight <= 0:
            raise ValueError("an update's weight must be positive")
        self._weight += weight
        self._count += 1

    def mean(self) -> Vector:
        if self._count == 0:
            raise ValueError("no update was added")
        out = np.empty(self._sum.size, dtype=np.float32)
        return np.divide(self._sum, self._weight, out=out, casting="same_kind")


def apply_update(
    global_vector: Vector,
    manifest: Manifest,
    update_manifest: Manifest,
    mean_delta: Vector,
    *,
    server_lr: float = 1.0,
) -> Vector:
    """New global = global + lr * mean delta, scattering a partial update (FFA-LoRA: B only) by name."""
    if mean_delta.size != update_manifest.numel:
        raise ValueError(f"delta has {mean_delta.size} elements, update manifest {update_manifest.numel}")
    out = global_vector.copy()
    if update_manifest == manifest:
        out += np.float32(server_lr) * mean_delta
        return out
    where = manifest.offsets()
    for spec, (start, stop) in zip(update_manifest.tensors, update_manifest.offsets().values(), strict=True):
        g_start, g_stop = where[spec.name]
        out[g_start:g_stop] += np.float32(server_lr) * mean_delta[start:stop]
    return out
