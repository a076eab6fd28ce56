"""What happens to an update between training and the wire. Pure functions over numpy vectors.

Today: the delta is bounded in L2 norm. Noise, quantization and masking (later issues) slot in
here, in this order, so nothing unprotected reaches the transport.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["clip_l2", "protect_update"]

Vector = npt.NDArray[np.float32]


def clip_l2(vector: Vector, bound: float) -> Vector:
    """Scale vector down to L2 norm `bound` if it is longer; bound <= 0 means unbounded."""
    if bound <= 0:
        return vector
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm <= bound:
        return vector
    return (vector * np.float32(bound / norm)).astype(np.float32)


def protect_update(delta: Vector, *, clip_norm: float) -> Vector:
    if not np.isfinite(delta).all():
        raise ValueError("the local update holds NaN or Inf; training diverged")
    return clip_l2(delta, clip_norm)
