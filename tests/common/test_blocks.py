"""Named blocks: each rank index of a heterogeneous-rank update is averaged over the sites that trained it."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_common.blocks import block_groups, group_mean, pad_to_rank, site_weights, truncate_to_rank
from fedlora_common.manifest import Manifest, TensorSpec, flatten, unflatten

RANK = 4
MANIFEST = Manifest(
    (
        TensorSpec("base_model.model.layers.0.q_proj.lora_A.weight", (RANK, 6)),
        TensorSpec("base_model.model.layers.0.q_proj.lora_B.weight", (5, RANK)),
        TensorSpec("base_model.model.score.weight", (3,)),
    )
)


def _states(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    return [{t.name: rng.standard_normal(t.shape).astype(np.float32) for t in MANIFEST.tensors} for _ in range(count)]


def test_each_rank_index_is_the_weighted_mean_of_the_sites_that_trained_it() -> None:
    # Prepare: three sites of ranks 1, 2 and 4 with unequal weights, each update zero beyond its rank.
    rng = np.random.default_rng(7)
    ranks, weights = [1, 2, 4], [30.0, 10.0, 60.0]
    full = _states(rng, 3)
    trained = [
        pad_to_rank(
            truncate_to_rank(s, rank=RANK, site_rank=r), {n: np.zeros_like(a) for n, a in s.items()}, site_rank=r
        )
        for s, r in zip(full, ranks, strict=True)
    ]
    groups = block_groups(MANIFEST, rank=RANK, heterogeneous=True)

    # Execute: fold as the coordinator does (sum of w * update, sum of the sites' group weights).
    sums = sum(np.float64(w) * flatten(MANIFEST, s).astype(np.float64) for s, w in zip(trained, weights, strict=True))
    group_weights = sum(site_weights(groups, site_rank=r, weight=w) for r, w in zip(ranks, weights, strict=True))
    mean = unflatten(MANIFEST, group_mean(sums, MANIFEST, groups, group_weights))

    # Assert: against a per-index reference in the clear.
    a, b = "base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"
    for k in range(RANK):
        who = [i for i, r in enumerate(ranks) if r > k]
        total = sum(weights[i] for i in who)
        expect_a = sum(weights[i] * full[i][a][k].astype(np.float64) for i in who) / total
        expect_b = sum(weights[i] * full[i][b][:, k].astype(np.float64) for i in who) / total
        np.testing.assert_allclose(mean[a][k], expect_a, rtol=1e-6)
        np.testing.assert_allclose(mean[b][:, k], expect_b, rtol=1e-6)
    expect_rest = (
        sum(w * s["base_model.model.score.weight"].astype(np.float64) for s, w in zip(full, weights, strict=True))
        / 100.0
    )
    np.testing.assert_allclose(mean["base_model.model.score.weight"], expect_rest, rtol=1e-6)


def test_one_group_divides_everything_by_the_one_weight() -> None:
    groups = block_groups(MANIFEST, rank=RANK, heterogeneous=False)
    sums = np.arange(MANIFEST.numel, dtype=np.float64)

    mean = group_mean(sums, MANIFEST, groups, site_weights(groups, site_rank=RANK, weight=4.0))

    assert groups.count == 1
    assert np.array_equal(mean, (sums / 4.0).astype(np.float32))


def test_a_rank_index_no_site_trained_averages_to_zero() -> None:
    groups = block_groups(MANIFEST, rank=RANK, heterogeneous=True)
    sums = np.ones(MANIFEST.numel, dtype=np.float64)

    mean = unflatten(MANIFEST, group_mean(sums, MANIFEST, groups, site_weights(groups, site_rank=2, weight=1.0)))

    assert not mean["base_model.model.layers.0.q_proj.lora_A.weight"][2:].any()
    assert not mean["base_model.model.layers.0.q_proj.lora_B.weight"][:, 2:].any()
    assert (mean["base_model.model.layers.0.q_proj.lora_A.weight"][:2] == 1).all()


def test_truncating_then_padding_over_the_same_state_gives_it_back_bit_for_bit() -> None:
    state = _states(np.random.default_rng(1), 1)[0]

    again = pad_to_rank(truncate_to_rank(state, rank=RANK, site_rank=3), state, site_rank=3)

    assert all(np.array_equal(again[name], state[name]) for name in state)


def test_a_lora_tensor_without_a_rank_axis_is_refused_by_name() -> None:
    fused = Manifest((TensorSpec("base_model.model.experts.lora_A.weight", (RANK * 8, 6)),))

    with pytest.raises(ValueError, match=r"experts\.lora_A\.weight .* no rank axis of length 4"):
        block_groups(fused, rank=RANK, heterogeneous=True)
