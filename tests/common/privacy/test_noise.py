"""Distributed Skellam noise: the target variance from any t workers, intact through quantization and masking."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_common.privacy import (
    MAX_POISSON_MEAN,
    add_integer_noise,
    central_noise,
    plan_distributed_noise,
    skellam_noise,
)
from fedlora_common.secagg import mask_vector, pairwise_sign, quantize, unmask_sum


def test_any_t_workers_together_carry_the_target_variance() -> None:
    # Prepare: 5 workers, threshold 3, target z = 1.2.
    plan = plan_distributed_noise(participants=5, threshold=3, noise_multiplier=1.2, clip_norm=0.5, dimension=4096)
    rng = np.random.default_rng(20261125)
    draws = 200_000

    # Execute: the sum of t workers' noise, many times over.
    total = np.sum([skellam_noise(draws, variance=plan.worker_variance, rng=rng) for _ in range(3)], axis=0)

    # Assert: variance (z * sensitivity)^2. The sample variance's relative std is sqrt(2 / N) = 0.32%,
    # so 2% is over six standard deviations: it cannot pass by accident with a wrong variance.
    target = (1.2 * plan.sensitivity) ** 2
    assert total.dtype == np.int64
    assert np.var(total.astype(np.float64)) == pytest.approx(target, rel=0.02)
    assert abs(float(np.mean(total))) < 6 * np.sqrt(target / draws)


def test_the_plan_uses_the_most_bits_that_cannot_wrap() -> None:
    n, t, z, d = 4, 3, 1.0, 10_000
    plan = plan_distributed_noise(participants=n, threshold=t, noise_multiplier=z, clip_norm=1.0, dimension=d)

    def fits(bits: int) -> bool:
        levels = (1 << (bits - 1)) - 1
        sensitivity = levels + np.sqrt(d)
        no_wrap = n * levels + 8 * z * np.sqrt(n / t) * sensitivity <= 2**31 - 1
        return bool(no_wrap and (z * sensitivity) ** 2 / t / 2 <= MAX_POISSON_MEAN)

    assert fits(plan.bits)
    assert not fits(plan.bits + 1)
    assert plan.sensitivity == pytest.approx((1 << (plan.bits - 1)) - 1 + 100)
    assert plan.worker_variance == pytest.approx((z * plan.sensitivity) ** 2 / t)


def test_noise_survives_quantization_and_masking_unchanged() -> None:
    # Prepare: three workers' clipped updates, quantized, noised, then masked pairwise.
    plan = plan_distributed_noise(participants=3, threshold=2, noise_multiplier=1.0, clip_norm=0.5, dimension=1000)
    rng = np.random.default_rng(7)
    updates = [rng.normal(0, 0.01, 1000).astype(np.float32) for _ in range(3)]
    quantized = [quantize(u, clip=plan.clip, bits=plan.bits, rng=rng) for u in updates]
    noises = [skellam_noise(1000, variance=plan.worker_variance, rng=rng) for _ in range(3)]
    seeds = [bytes([i + 1]) * 32 for i in range(3)]
    pair_seed = {frozenset((i, j)): bytes([10 + i + j]) * 32 for i in range(3) for j in range(3) if i != j}

    # Execute: each masks its noisy vector; the coordinator sums and removes the self masks.
    masked = [
        mask_vector(
            add_integer_noise(quantized[i], noises[i]),
            self_seed=seeds[i],
            pairwise=[(pair_seed[frozenset((i, j))], pairwise_sign(i, j)) for j in range(3) if j != i],
        )
        for i in range(3)
    ]
    total = unmask_sum(np.sum(masked, axis=0, dtype=np.uint32), self_seeds=seeds, dropped_pairwise=[])

    # Assert: exactly the sum of the quantized updates plus the sum of the noise, as signed integers.
    expected = sum(q.view(np.int32).astype(np.int64) for q in quantized) + sum(noises)
    assert np.array_equal(total.view(np.int32).astype(np.int64), expected)


def test_central_noise_has_the_requested_std() -> None:
    noise = central_noise(100_000, std=0.3, rng=np.random.default_rng(3))

    assert np.std(noise) == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"participants": 3, "threshold": 1, "noise_multiplier": 1.0, "clip_norm": 1.0, "dimension": 10}, "threshold"),
        ({"participants": 3, "threshold": 2, "noise_multiplier": 0.0, "clip_norm": 1.0, "dimension": 10}, "positive"),
        ({"participants": 3, "threshold": 2, "noise_multiplier": 1e12, "clip_norm": 1.0, "dimension": 10}, "no room"),
    ],
)
def test_impossible_plans_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_distributed_noise(**kwargs)  # type: ignore[arg-type]
