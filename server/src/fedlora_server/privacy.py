"""The run's client-level privacy: noise multiplier, where noise is added, and epsilon after each round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedlora_common.privacy import gaussian_epsilon, noise_for_epsilon
from fedlora_server.config import RunSettings

__all__ = ["ClientPrivacy"]


@dataclass
class ClientPrivacy:
    """DP-FedAvg as this run applies it. Every admitted worker is invited to every round, so the
    sampling rate is 1 and no amplification by sampling is claimed."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    placement: Literal["distributed", "central"]
    budget: float | None
    _epsilons: dict[int, float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: RunSettings) -> ClientPrivacy | None:
        """None without client-level DP; with a target epsilon, z is solved for all of the run's rounds."""
        dp, placement = settings.privacy.client_dp, settings.client_dp_placement
        if dp is None or placement is None:
            return None
        z = dp.noise_multiplier
        if z is None:
            assert dp.target_epsilon is not None
            z = noise_for_epsilon(dp.target_epsilon, steps=settings.rounds, delta=dp.delta)
        return cls(z, dp.clip_norm, dp.delta, placement, dp.epsilon_budget)

    def epsilon_after(self, rounds: int) -> float:
        if rounds not in self._epsilons:
            self._epsilons[rounds] = gaussian_epsilon(self.noise_multiplier, steps=rounds, delta=self.delta)
        return self._epsilons[rounds]

    def allows(self, round_: int) -> bool:
        """Whether running round `round_` keeps the run within its budget."""
        return self.budget is None or self.epsilon_after(round_) <= self.budget

    def describe(self) -> dict[str, Any]:
        trust = (
            "trusts the coordinator, which adds the noise after seeing the sum"
            if self.placement == "central"
            else "each worker adds Skellam noise before masking; any t survivors carry the full noise"
        )
        return {
            "mechanism": f"DP-FedAvg, {self.placement} noise (Gaussian-equivalent), PLD accountant, sampling rate 1",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "placement": self.placement,
            "trust": trust,
            "epsilon_budget": self.budget,
        }
