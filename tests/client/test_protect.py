"""The protection pipeline, clip -> weight -> quantize -> noise -> mask: each step alone, then together."""

import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_common.aggregation import weighted_mean
from fedlora_common.privacy import skellam_noise
from fedlora_common.secagg import SecAggParams, dequantize_sum, pairwise_sign, quantization_step, unmask_sum
from fedlora_worker.protect import (
    MaskSeeds,
    clip,
    clip_l2,
    encode,
    mask,
    noise,
    noise_generator,
    rounding_generator,
    weight,
)

WORKERS = ("clinical", "legal", "finance")
EXAMPLES = {"clinical": 40, "legal": 7, "finance": 100}  # finance is above the cap
MAX_EXAMPLES = 64
CLIP_NORM = 0.5
BITS = 16  # coarse enough that float32 rounding is far below one quantization step


def params(noise_variance: float = 0.0) -> SecAggParams:
    return SecAggParams(
        run_id="run",
        tag=5 * 2**16 + 1,
        participants=WORKERS,
        threshold=2,
        bits=BITS,
        clip_range=CLIP_NORM,
        max_examples=MAX_EXAMPLES,
        noise_variance=noise_variance,
    )


def deltas(size: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {w: rng.normal(0.0, 0.05, size).astype(np.float32) for w in WORKERS}


def full_mesh_seeds() -> dict[str, MaskSeeds]:
    """Self seeds and pairwise seeds as sessions derive them: one seed per pair, opposite signs."""
    index = {w: i for i, w in enumerate(WORKERS)}
    pair = {frozenset((a, b)): os.urandom(32) for a in WORKERS for b in WORKERS if a != b}
    return {
        w: MaskSeeds(
            os.urandom(32),
            tuple((pair[frozenset((w, p))], pairwise_sign(index[w], index[p])) for p in WORKERS if p != w),
        )
        for w in WORKERS
    }


def unmasked_sum(masked: dict[str, np.ndarray], seeds: dict[str, MaskSeeds]) -> np.ndarray:
    total = np.zeros_like(next(iter(masked.values())))
    for vector in masked.values():
        total += vector  # uint32: wraps mod 2**32, as the coordinator's accumulator does
    return unmask_sum(total, self_seeds=[seeds[w].self_seed for w in masked], dropped_pairwise=[])


# ---------------------------------------------------------------------------------------------- clip


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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_diverged_update_never_leaves_the_site(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip(np.array([1.0, bad], dtype=np.float32), 1.0)


# --------------------------------------------------------------------------------------------- weight


def test_weighting_scales_by_the_capped_example_count_over_the_maximum() -> None:
    update = np.array([0.5, -0.25, 1.0], dtype=np.float32)

    small = weight(update, examples=16, max_examples=64)
    capped = weight(update, examples=1000, max_examples=64)

    assert small.weight == 16
    np.testing.assert_array_equal(small.vector, update * np.float32(0.25))
    assert capped.weight == 64
    np.testing.assert_array_equal(capped.vector, update)


def test_weighting_refuses_a_site_without_examples() -> None:
    with pytest.raises(ValueError, match="positive"):
        weight(np.zeros(3, dtype=np.float32), examples=0, max_examples=64)


# ---------------------------------------------------------------------------------------------- noise


def test_no_variance_adds_no_noise() -> None:
    quantized = np.arange(10, dtype=np.uint32)

    assert noise(quantized, variance=0.0, rng=np.random.default_rng(0)) is quantized


def test_noise_is_the_skellam_draw_of_the_generator_added_mod_2_32() -> None:
    quantized = np.array([0, 1, 2**32 - 1, 7] * 250, dtype=np.uint32)

    noised = noise(quantized, variance=1e6, rng=np.random.default_rng(3))

    expected = skellam_noise(quantized.size, variance=1e6, rng=np.random.default_rng(3))
    np.testing.assert_array_equal((noised - quantized).view(np.int32).astype(np.int64), expected)
    assert np.var(expected) == pytest.approx(1e6, rel=0.2)


def test_noise_comes_from_the_operating_system_and_differs_every_time() -> None:
    zeros = np.zeros(64, dtype=np.uint32)

    first = noise(zeros, variance=1e6, rng=noise_generator())
    second = noise(zeros, variance=1e6, rng=noise_generator())

    assert not np.array_equal(first, second)


# ---------------------------------------------------------------------------------------------- mask


def test_a_masked_vector_looks_nothing_like_the_update_but_masks_cancel_in_the_sum() -> None:
    seeds = full_mesh_seeds()
    encoded = {w: np.full(4096, i + 1, dtype=np.uint32) for i, w in enumerate(WORKERS)}

    masked = {w: mask(encoded[w], seeds[w]) for w in WORKERS}

    assert all(np.mean(masked[w] == encoded[w]) < 0.01 for w in WORKERS)
    np.testing.assert_array_equal(unmasked_sum(masked, seeds), np.full(4096, 1 + 2 + 3, dtype=np.uint32))


# ---------------------------------------------------------------------------------------- the pipeline


def test_rounding_is_fixed_by_run_round_and_worker_so_a_retried_attempt_sends_the_same_update() -> None:
    delta = deltas()["clinical"]

    def encoded(run_seed: int, round_: int, worker: str, tag: int) -> np.ndarray:
        attempt = replace(params(), tag=tag)
        rounding = rounding_generator(run_seed, round_, worker)
        return encode(
            delta, clip_norm=CLIP_NORM, examples=40, params=attempt, rounding=rounding, noise_rng=noise_generator()
        )

    first = encoded(7, 5, "clinical", tag=5 * 2**16)
    retried = encoded(7, 5, "clinical", tag=5 * 2**16 + 1)

    np.testing.assert_array_equal(first, retried)
    assert not np.array_equal(first, encoded(7, 6, "clinical", tag=6 * 2**16))
    assert not np.array_equal(first, encoded(7, 5, "legal", tag=5 * 2**16))
    assert not np.array_equal(first, encoded(8, 5, "clinical", tag=5 * 2**16))


def test_encode_clips_weights_quantizes_and_appends_the_weight() -> None:
    delta = deltas()["clinical"] * np.float32(100)  # far beyond the clip norm
    p = params()

    encoded = encode(
        delta,
        clip_norm=CLIP_NORM,
        examples=40,
        params=p,
        rounding=rounding_generator(0, 1, "clinical"),
        noise_rng=noise_generator(),
    )

    expected = clip_l2(delta, CLIP_NORM) * np.float32(40 / MAX_EXAMPLES)
    values = encoded[:-1].view(np.int32) * quantization_step(p.clip_range, p.bits)
    assert encoded.size == delta.size + 1
    assert encoded[-1] == 40
    assert np.abs(values - expected).max() <= quantization_step(p.clip_range, p.bits)


def test_noise_survives_quantization_and_masking_bit_exactly() -> None:
    delta, p, seeds = deltas()["legal"], params(noise_variance=1e6), full_mesh_seeds()

    def encoded(p: SecAggParams, noise_rng: np.random.Generator) -> np.ndarray:
        return encode(
            delta,
            clip_norm=CLIP_NORM,
            examples=7,
            params=p,
            rounding=rounding_generator(1, 2, "legal"),
            noise_rng=noise_rng,
        )

    quiet = encoded(params(), noise_generator())
    noisy = encoded(p, np.random.default_rng(9))

    draw = skellam_noise(delta.size, variance=1e6, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(noisy[:-1] - quiet[:-1], draw.astype(np.uint32))
    assert noisy[-1] == quiet[-1] == 7  # the weight coordinate carries no noise
    masked_difference = mask(noisy, seeds["legal"]) - mask(quiet, seeds["legal"])
    np.testing.assert_array_equal(masked_difference[:-1], draw.astype(np.uint32))


@pytest.mark.parametrize("variance", [0.0, 1e6])
def test_the_sum_of_protected_updates_unmasks_to_the_weighted_mean_of_clipped_deltas(variance: float) -> None:
    # Prepare: three sites, one of them above the example cap, deltas partly beyond the clip norm.
    p, seeds = params(variance), full_mesh_seeds()
    updates = {w: d * np.float32(scale) for (w, d), scale in zip(deltas(4000).items(), (1, 30, 3), strict=True)}
    noise_rngs = {w: np.random.default_rng(i) for i, w in enumerate(WORKERS)}

    # Execute: every site protects its update; the coordinator sums, unmasks and dequantizes.
    masked = {
        w: mask(
            encode(
                updates[w],
                clip_norm=CLIP_NORM,
                examples=EXAMPLES[w],
                params=p,
                rounding=rounding_generator(0, 1, w),
                noise_rng=noise_rngs[w],
            ),
            seeds[w],
        )
        for w in WORKERS
    }
    total = unmasked_sum(masked, seeds)
    weights = [min(EXAMPLES[w], MAX_EXAMPLES) for w in WORKERS]
    mean = dequantize_sum(total[:-1], clip=p.clip_range, bits=p.bits) * (MAX_EXAMPLES / int(total[-1]))

    # Assert: the weight coordinate sums exactly; the mean is within n quantization steps (scaled
    # back by M / sum(w)) of the weighted mean of the clipped deltas, plus the noise, which
    # reappears exactly.
    assert int(total[-1]) == sum(weights)
    expected = weighted_mean([clip_l2(updates[w], CLIP_NORM) for w in WORKERS], [float(x) for x in weights])
    step = quantization_step(p.clip_range, p.bits)
    bound = len(WORKERS) * step * MAX_EXAMPLES / sum(weights)
    noise_sum = sum(
        skellam_noise(expected.size, variance=variance, rng=np.random.default_rng(i)) for i in range(len(WORKERS))
    )
    error = mean - expected - noise_sum * step * MAX_EXAMPLES / sum(weights)
    assert np.abs(error).max() <= bound * (1 + 1e-6)
    assert np.abs(expected).max() > 100 * bound  # the bound is tight enough to catch a wrong mean
