"""An update as named blocks, each averaged over exactly the sites that trained it.

Under FedAvg and FFA-LoRA every site trains every tensor of the update, so the whole update is one
block group and one weight divides its sum. Under heterogeneous rank (HetLoRA, Cho et al. 2024) site i
trains only the leading r_i ranks of the run's rank-R adapter: row k of each LoRA A and column k of each
B belong to group k + 1, which only the sites with r_i > k train; tensors without a rank axis are group 0.
A site sends its update zero-padded to rank R together with one weight per group (its weight for the
groups it trained, 0 for the rest), so the sum of updates and the sum of weights fold alike, in the clear
or inside the secure sum, and each group's mean is its sum over its own weight.

Pure functions over flat float vectors in manifest order; `rank_slices` and `truncate`/`pad` move a
state between the run's rank and a site's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlora_common.manifest import Manifest

__all__ = ["BlockGroups", "block_groups", "group_mean", "pad_to_rank", "rank_axis", "site_weights", "truncate_to_rank"]

_A_NAMES = (".lora_A.", ".lora_embedding_A")
_B_NAMES = (".lora_B.", ".lora_embedding_B")


@dataclass(frozen=True)
class BlockGroups:
    """How an update's elements fold: `rank` 0 for one group; else group 0 plus one per rank index.

    `axes` gives, per tensor of the update manifest in order, the axis that indexes the rank (None: group 0).
    """

    rank: int
    axes: tuple[int | None, ...]

    @property
    def count(self) -> int:
        return 1 + self.rank if self.rank else 1


def rank_axis(name: str, shape: tuple[int, ...], rank: int) -> int | None:
    """The axis of a LoRA tensor that indexes its rank (A: rows, B: columns), None for other tensors.

    ValueError for a LoRA tensor whose rank axis is not `rank` long (peft's fused-expert parameters stack
    the experts' ranks along it), which heterogeneous rank cannot pad.
    """
    axis = 0 if any(part in name for part in _A_NAMES) else 1 if any(part in name for part in _B_NAMES) else None
    if axis is None:
        return None
    if len(shape) != 2 or shape[axis] != rank:
        raise ValueError(
            f"tensor {name} {shape} has no rank axis of length {rank}: heterogeneous rank pads 2-d LoRA A and B "
            "only (fused experts stack their ranks); use aggregation fedavg for this model"
        )
    return axis


def block_groups(manifest: Manifest, *, rank: int, heterogeneous: bool) -> BlockGroups:
    """The update manifest's groups: one, or (heterogeneous) one per rank index plus one for the rest."""
    if not heterogeneous:
        return BlockGroups(0, (None,) * len(manifest.tensors))
    return BlockGroups(rank, tuple(rank_axis(t.name, t.shape, rank) for t in manifest.tensors))


def site_weights(groups: BlockGroups, *, site_rank: int, weight: float) -> npt.NDArray[np.float64]:
    """One site's weight in each group: `weight` where it trained (rank indices below `site_rank`), else 0."""
    if site_rank < 1 or (groups.rank and site_rank > groups.rank):
        raise ValueError(f"site rank {site_rank} outside 1..{groups.rank}")
    out = np.zeros(groups.count, dtype=np.float64)
    out[0] = weight
    out[1 : 1 + min(site_rank, groups.rank)] = weight
    return out


def group_mean(
    sums: npt.NDArray[np.float64], manifest: Manifest, groups: BlockGroups, weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """Each element's sum over its group's weight; a group no site trained (weight 0) averages to 0."""
    if weights.size != groups.count:
        raise ValueError(f"{weights.size} group weights for {groups.count} groups")
    if weights[0] <= 0:
        raise ValueError("the aggregated weight is zero")
    safe = np.where(weights > 0, weights, np.inf)
    out = np.empty(sums.size, dtype=np.float32)
    for spec, axis, (start, stop) in zip(manifest.tensors, groups.axes, manifest.offsets().values(), strict=True):
        block = sums[start:stop].reshape(spec.shape)
        if axis is None:
            divisor: npt.NDArray[np.float64] | np.float64 = safe[0]
        else:
            divisor = safe[1:].reshape((-1, 1) if axis == 0 else (1, -1))
        out[start:stop] = (block / divisor).reshape(-1)
    return out


def truncate_to_rank(
    state: Mapping[str, npt.NDArray[np.float32]], *, rank: int, site_rank: int
) -> dict[str, npt.NDArray[np.float32]]:
    """A rank-`rank` LoRA state cut to its leading `site_rank` ranks (what a smaller site loads and trains)."""
    out = {}
    for name, array in state.items():
        axis = rank_axis(name, tuple(array.shape), rank)
        out[name] = array if axis is None else np.ascontiguousarray(np.take(array, range(site_rank), axis=axis))
    return out


def pad_to_rank(
    state: Mapping[str, npt.NDArray[np.float32]], into: Mapping[str, npt.NDArray[np.float32]], *, site_rank: int
) -> dict[str, npt.NDArray[np.float32]]:
    """A site's rank-`site_rank` state written over the leading ranks of the full-rank `into` (a copy): the
    ranks it did not train keep `into`'s values, so its update there is exactly zero."""
    out = {}
    for name, full in into.items():
        array = state[name]
        if array.shape == full.shape:
            out[name] = np.array(array, dtype=np.float32)
            continue
        axis = 0 if array.shape[0] != full.shape[0] else 1
        if array.shape[axis] != site_rank:
            raise ValueError(f"tensor {name}: shape {array.shape} is not rank {site_rank} of {full.shape}")
        padded = np.array(full, dtype=np.float32)
        if axis == 0:
            padded[:site_rank] = array
        else:
            padded[:, :site_rank] = array
        out[name] = padded
    return out
