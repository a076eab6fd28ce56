"""Goldfish loss (Hans et al. 2024): leave a pseudo-random 1/k of the tokens out of the loss.

Which tokens are left out depends only on the h tokens before each one, so a passage that recurs
anywhere in the data loses the same tokens every time: the model never trains on all of it and
cannot reproduce it verbatim. The first h positions of a row have no full context and always count.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from fedlora_common.plans import GoldfishPlan

__all__ = ["goldfish_mask"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: a bijection on uint64 whose output bits all depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def goldfish_mask(input_ids: torch.Tensor, plan: GoldfishPlan) -> torch.Tensor:
    """True where token t counts in the loss: dropped when the hash of ids[t-h:t] is below 2**64 / k.

    The hash chains splitmix64 over the h ids in order (order-sensitive), starting from a state
    derived from plan.seed; uint64 arithmetic wraps by definition in numpy, so every process and
    machine computes the same mask. h vector passes over the batch: cheap next to a forward pass.
    """
    k, h = plan.k, plan.h
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu().numpy().astype(np.uint64)
    rows, length = ids.shape
    keep = np.ones((rows, length), dtype=bool)
    if length > h:
        start = _mix(np.array([plan.seed % 2**64], dtype=np.uint64) + _GOLDEN)
        state = np.broadcast_to(start, (rows, length - h))
        for offset in range(h):  # state[:, j] absorbs ids[j .. j+h-1], the context of token j+h
            state = _mix(state ^ ids[:, offset : length - h + offset])
        keep[:, h:] = state >= np.uint64(2**64 // k)
    return torch.from_numpy(keep).to(input_ids.device)
