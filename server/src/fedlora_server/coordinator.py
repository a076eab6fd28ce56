"""The coordinator for one run, composed: the phase machine over this run's aggregator, strategy, versions and plans.

What varies between runs is chosen here, once: aggregation in the clear or secure (Bonawitz
et al.), the strategy that makes the next global model of the round's mean (FedAvg or a server
optimizer, weighting updates by examples or, under client-level DP, unweighted), and central DP
noise wrapped around that strategy when the coordinator is trusted to add it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedlora_server.aggregation import Aggregator, PlainAggregator, SecureAggregator, Weighting
from fedlora_server.config import RunSettings
from fedlora_server.machine import PhaseMachine
from fedlora_server.metrics import ServerMetrics
from fedlora_server.phases import PhaseName
from fedlora_server.planning import RoundPlans
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.store import CoordinatorStore
from fedlora_server.strategy import CentralNoise, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from fedlora_server.versions import GlobalModel, Versions

__all__ = ["Coordinator", "GlobalModel", "PhaseName", "build_aggregator", "build_strategy"]


def build_strategy(settings: RunSettings, privacy: ClientPrivacy | None) -> Strategy:
    """The run's server optimizer, with central noise around it when the coordinator adds the DP noise."""
    # DP-FedAvg averages unweighted: an example count would scale a site's influence past the clip.
    weighting: Weighting = "examples" if privacy is None else "uniform"
    o = settings.server_optimizer
    inner: Strategy
    match o.name:
        case "fedavgm":
            inner = FedAvgM(weighting=weighting, lr=o.lr, beta1=o.beta1)
        case "fedadam":
            inner = FedAdam(weighting=weighting, lr=o.lr, beta1=o.beta1, beta2=o.beta2, tau=o.tau)
        case "fedyogi":
            inner = FedYogi(weighting=weighting, lr=o.lr, beta1=o.beta1, beta2=o.beta2, tau=o.tau)
        case "none":
            inner = FedAvg(weighting=weighting)
    if privacy is None or privacy.placement != "central":
        return inner
    return CentralNoise(inner, noise_multiplier=privacy.noise_multiplier, clip_norm=privacy.clip_norm)


def build_aggregator(
    settings: RunSettings, privacy: ClientPrivacy | None, metrics: ServerMetrics, *, weighting: Weighting
) -> Aggregator:
    """Secure aggregation when enabled, else in the clear, weighting updates as the strategy says."""
    spool_dir = settings.state_dir / "spool"
    if settings.secure_aggregation.enabled:
        identities = {w.id: bytes.fromhex(w.identity_public) for w in settings.workers if w.identity_public}
        return SecureAggregator(
            run_id=settings.run_id,
            settings=settings.secure_aggregation,
            max_examples=settings.max_examples,
            identities=identities,
            privacy=privacy,
            metrics=metrics,
            journal_dir=spool_dir,
        )
    return PlainAggregator(
        weighting=weighting, max_examples=settings.max_examples, spool_dir=spool_dir, metrics=metrics
    )


class Coordinator(PhaseMachine):
    """Schedules rounds and aggregates updates for one run. Thread-safe; every method is transport-free."""

    def __init__(
        self,
        *,
        settings: RunSettings,
        store: CoordinatorStore,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        privacy = ClientPrivacy.from_settings(settings)
        strategy = build_strategy(settings, privacy)
        super().__init__(
            settings=settings,
            store=store,
            metrics=metrics,
            versions=Versions(
                state_dir=settings.state_dir,
                mode=settings.mode,
                aggregation=settings.aggregation,
                store=store,
                clock=clock,
                strategy=strategy,
            ),
            aggregator=build_aggregator(settings, privacy, metrics, weighting=strategy.weighting),
            plans=RoundPlans(settings, privacy),
            privacy=privacy,
            clock=clock,
            spool_dir=settings.state_dir / "spool",
        )
