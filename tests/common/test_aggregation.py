import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_common.aggregation import StreamingAccumulator, apply_update, weighted_mean
from fedlora_common.manifest import Manifest, TensorSpec, update_manifest


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    workers=st.integers(1, 6),
    numel=st.integers(1, 300),
    slice_len=st.integers(1, 64),
)
def test_streaming_accumulator_equals_the_weighted_mean(seed: int, workers: int, numel: int, slice_len: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(size=numel).astype(np.float32) for _ in range(workers)]
    weights = [float(w) for w in rng.integers(1, 1000, size=workers)]
    acc = StreamingAccumulator(numel)

    for update, weight in zip(updates, weights, strict=True):
        for start in range(0, numel, slice_len):
            acc.add_slice(start, update[start : start + slice_len], weight)
        acc.close_update(weight)

    np.testing.assert_allclose(acc.mean(), weighted_mean(updates, weights), rtol=1e-6, atol=1e-6)
    expected = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(acc.mean(), expected, rtol=1e-5, atol=1e-6)
    assert acc.contributors == workers


def test_weighted_mean_favours_the_larger_site() -> None:
    small, large = np.zeros(3, dtype=np.float32), np.ones(3, dtype=np.float32)

    mean = weighted_mean([small, large], [1.0, 3.0])

    np.testing.assert_allclose(mean, 0.75)


def test_accumulator_refuses_a_slice_outside_the_update() -> None:
    acc = StreamingAccumulator(4)

    with pytest.raises(ValueError, match="outside"):
        acc.add_slice(3, np.ones(2, dtype=np.float32), 1.0)


def test_ffa_update_changes_only_b() -> None:
    manifest = Manifest((TensorSpec("m.lora_A.weight", (2, 3)), TensorSpec("m.lora_B.weight", (3, 2))))
    sent = update_manifest(manifest, "ffa")
    global_vector = np.arange(12, dtype=np.float32)

    new = apply_update(global_vector, manifest, sent, np.full(6, 0.5, dtype=np.float32))

    np.testing.assert_array_equal(new[:6], global_vector[:6])
    np.testing.assert_array_equal(new[6:], global_vector[6:] + 0.5)
