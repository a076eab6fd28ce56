"""Differential privacy's pure parts: accounting (dp-accounting PLD) and the noise each placement adds."""

from fedlora_common.privacy.accounting import gaussian_epsilon, noise_for_epsilon
from fedlora_common.privacy.noise import (
    MAX_POISSON_MEAN,
    DistributedNoise,
    add_integer_noise,
    central_noise,
    plan_distributed_noise,
    skellam_noise,
)

__all__ = [
    "MAX_POISSON_MEAN",
    "DistributedNoise",
    "add_integer_noise",
    "central_noise",
    "gaussian_epsilon",
    "noise_for_epsilon",
    "plan_distributed_noise",
    "skellam_noise",
]
