"""How a round's mean update becomes the next global model: the rule, apart from the aggregation machinery.

The aggregators fold the updates into a mean (weighted as the strategy says); the strategy turns that
mean into the next global vector and its own state. FedAvg adds it; a server optimizer (FedAvgM,
FedAdam, FedYogi: Reddi et al. 2021) treats it as a pseudo-gradient over the update's elements only
(the B matrices under FFA-LoRA); central DP noise wraps either. A strategy's state (its moments) is
committed with each version, so a resumed run continues the very same trajectory.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlora_common.aggregation import apply_update
from fedlora_common.manifest import Manifest
from fedlora_common.privacy import central_noise
from fedlora_server.aggregation import Weighting
from fedlora_server.server_optimizers import (
    Moment,
    adam_second_moment,
    adaptive_step,
    first_moment,
    momentum,
    yogi_second_moment,
)

__all__ = [
    "CentralNoise",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "OptimizerState",
    "Strategy",
    "os_seeded",
]

Vector = npt.NDArray[np.float32]
OptimizerState = Mapping[str, Moment]
"""Named arrays over the update's elements (empty for a stateless strategy)."""


class Strategy(abc.ABC):
    """The rule that makes the next global model of the mean update. It keeps nothing itself: its state is
    passed in and returned, so that Versions can commit that state with each version."""

    weighting: Weighting
    """What the aggregators weight each update by: its example count, or one each (DP-FedAvg)."""
    state_names: tuple[str, ...] = ()
    """The arrays of its state, as they are stored; none for a stateless strategy."""

    @property
    def stateful(self) -> bool:
        return bool(self.state_names)

    def fresh_state(self, numel: int) -> OptimizerState:
        """The state before the first round, over an update of `numel` elements."""
        return {}

    def next_state(
        self,
        global_vector: Vector,
        manifest: Manifest,
        update_manifest: Manifest,
        mean_delta: Vector,
        state: OptimizerState,
        *,
        contributors: int,
    ) -> tuple[Vector, OptimizerState]:
        """The next global vector and state, from the current ones and the round's mean update (over
        `update_manifest`, scattered into `manifest` by name) of `contributors` updates."""
        step, state = self.step(mean_delta, state, contributors=contributors)
        return apply_update(global_vector, manifest, update_manifest, step), state

    @abc.abstractmethod
    def step(self, mean_delta: Vector, state: OptimizerState, *, contributors: int) -> tuple[Vector, OptimizerState]:
        """What to add to the global model's updated elements, and the next state."""


@dataclass(frozen=True, kw_only=True)
class FedAvg(Strategy):
    """global += mean update (McMahan et al. 2017)."""

    weighting: Weighting

    def step(self, mean_delta: Vector, state: OptimizerState, *, contributors: int) -> tuple[Vector, OptimizerState]:
        return mean_delta, state


@dataclass(frozen=True, kw_only=True)
class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): m = β1 m + Δ; x += η m."""

    weighting: Weighting
    lr: float
    beta1: float
    state_names = ("m",)

    def fresh_state(self, numel: int) -> OptimizerState:
        return {"m": np.zeros(numel, dtype=np.float64)}

    def step(self, mean_delta: Vector, state: OptimizerState, *, contributors: int) -> tuple[Vector, OptimizerState]:
        m = momentum(state["m"], mean_delta, beta1=self.beta1)
        return (self.lr * m).astype(np.float32), {"m": m}


@dataclass(frozen=True, kw_only=True)
class FedAdam(Strategy):
    """m = β1 m + (1-β1) Δ; v = β2 v + (1-β2) Δ²; x += η m / (√v + τ); m starts at 0, v at τ²."""

    weighting: Weighting
    lr: float
    beta1: float
    beta2: float
    tau: float
    state_names = ("m", "v")

    def fresh_state(self, numel: int) -> OptimizerState:
        return {"m": np.zeros(numel, dtype=np.float64), "v": np.full(numel, self.tau**2, dtype=np.float64)}

    def second_moment(self, v: Moment, delta: Vector) -> Moment:
        return adam_second_moment(v, delta, beta2=self.beta2)

    def step(self, mean_delta: Vector, state: OptimizerState, *, contributors: int) -> tuple[Vector, OptimizerState]:
        m = first_moment(state["m"], mean_delta, beta1=self.beta1)
        v = self.second_moment(state["v"], mean_delta)
        return adaptive_step(m, v, lr=self.lr, tau=self.tau).astype(np.float32), {"m": m, "v": v}


@dataclass(frozen=True, kw_only=True)
class FedYogi(FedAdam):
    """FedAdam with Yogi's second moment: v = v - (1-β2) Δ² sign(v - Δ²)."""

    def second_moment(self, v: Moment, delta: Vector) -> Moment:
        return yogi_second_moment(v, delta, beta2=self.beta2)


def os_seeded() -> np.random.Generator:
    """A generator seeded from the OS: nothing a participant could predict."""
    return np.random.default_rng(secrets.randbits(128))


class CentralNoise(Strategy):
    """Client-level DP with the noise added by the coordinator, wrapped around another strategy.

    DP-FedAvg (McMahan et al. 2018), central placement: the mean of n updates, each clipped to C and
    counted once, gets N(0, (zC/n)^2) per coordinate before the inner strategy sees it (what follows
    is post-processing, so a server optimizer keeps the guarantee). The coordinator sees the
    noiseless sum, so this placement trusts it.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        rng: Callable[[], np.random.Generator] = os_seeded,
    ) -> None:
        if inner.weighting != "uniform":
            raise ValueError(
                f"central noise needs uniform weighting (each clipped update counted once); the inner strategy "
                f"weights by {inner.weighting}, which would scale a site's influence past the clip norm"
            )
        if not clip_norm > 0:
            raise ValueError(f"central noise needs updates clipped to a positive norm, got clip_norm={clip_norm}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.weighting = inner.weighting
        self.state_names = inner.state_names
        self._rng = rng

    def fresh_state(self, numel: int) -> OptimizerState:
        return self.inner.fresh_state(numel)

    def step(self, mean_delta: Vector, state: OptimizerState, *, contributors: int) -> tuple[Vector, OptimizerState]:
        std = self.noise_multiplier * self.clip_norm / contributors
        noised = (mean_delta + central_noise(mean_delta.size, std=std, rng=self._rng())).astype(np.float32)
        return self.inner.step(noised, state, contributors=contributors)
