"""Client-level DP with the noise added by the coordinator, wrapped around another aggregator.

DP-FedAvg (McMahan et al. 2018), central placement: the mean of updates clipped to C gets
N(0, (zC/n)^2) per coordinate. The coordinator sees the noiseless sum, so this placement trusts
it; the noise comes from the OS, never from anything a participant could predict.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Mapping

import numpy as np

from fedlora_common.messages import UploadHeader
from fedlora_common.privacy import central_noise
from fedlora_server.aggregation.base import Aggregate, Aggregator, Ask, AttemptPlan, RoundAggregation, SecureMessage
from fedlora_server.intake import Received, UploadSink

__all__ = ["CentralNoise"]


class CentralNoise(Aggregator):
    def __init__(self, inner: Aggregator, *, noise_multiplier: float, clip_norm: float) -> None:
        self._inner = inner
        self._noise_multiplier = noise_multiplier
        self._clip_norm = clip_norm

    def open(self, plan: AttemptPlan) -> RoundAggregation:
        return _Noised(self._inner.open(plan), std_of_sum=self._noise_multiplier * self._clip_norm)

    def allow(self, identities: Mapping[str, bytes]) -> None:
        self._inner.allow(identities)


class _Noised(RoundAggregation):
    def __init__(self, inner: RoundAggregation, *, std_of_sum: float) -> None:
        super().__init__(inner.plan)
        self._inner = inner
        self._std_of_sum = std_of_sum

    @property
    def deadline_at(self) -> float:
        return self._inner.deadline_at

    @property
    def missing(self) -> tuple[str, ...]:
        return self._inner.missing

    def ask(self, worker: str) -> Ask | None:
        return self._inner.ask(worker)

    def open_upload(self, header: UploadHeader) -> UploadSink:
        return self._inner.open_upload(header)

    def accept(self, header: UploadHeader, sink: UploadSink, received: Received) -> int:
        return self._inner.accept(header, sink, received)

    def receive(self, worker: str, tag: int, message: SecureMessage) -> int:
        return self._inner.receive(worker, tag, message)

    def drop(self, worker: str) -> None:
        self._inner.drop(worker)

    def progress(self) -> Hashable:
        return self._inner.progress()

    def step(self, now: float) -> Aggregate | None:
        result = self._inner.step(now)
        if result is None:
            return None
        std = self._std_of_sum / len(result.contributors)
        noise = central_noise(result.mean.size, std=std, rng=np.random.default_rng(secrets.randbits(128)))
        return Aggregate((result.mean + noise).astype(np.float32), result.contributors, result.secagg)

    def discard(self) -> None:
        self._inner.discard()
