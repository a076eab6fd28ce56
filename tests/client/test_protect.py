import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_worker.protect import clip_l2, protect_update


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), bound=st.floats(0.01, 10.0), scale=st.floats(0.001, 100.0))
def test_clipping_bounds_the_norm_and_keeps_the_direction(seed: int, bound: float, scale: float) -> None:
    vector = (np.random.default_rng(seed).normal(size=64) * scale).astype(np.float32)

    clipped = clip_l2(vector, bound)

    assert np.linalg.norm(clipped) <= bound * (1 + 1e-5)
    if np.linalg.norm(vector) <= bound:
        np.testing.assert_array_equal(clipped, vector)
    else:
        cosine = clipped @ vector / (np.linalg.norm(clipped) * np.linalg.norm(vector))
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_a_zero_bound_leaves_the_update_unbounded() -> None:
    vector = np.full(4, 100.0, dtype=np.float32)

    np.testing.assert_array_equal(clip_l2(vector, 0.0), vector)


def test_a_diverged_update_never_leaves_the_site() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        protect_update(np.array([1.0, np.nan], dtype=np.float32), clip_norm=1.0)
