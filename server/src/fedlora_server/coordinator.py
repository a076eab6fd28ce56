"""The coordinator for one run, composed: the phase machine over this run's aggregator, versions and plans.

What varies between runs is chosen here, once: aggregation in the clear or secure (Bonawitz
et al.), FedAvg weighted by examples or (under client-level DP) unweighted, and central DP
noise wrapped around the aggregator when the coordinator is trusted to add it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedlora_server.aggregation import Aggregator, CentralNoise, PlainAggregator, SecureAggregator
from fedlora_server.config import RunSettings
from fedlora_server.machine import PhaseMachine
from fedlora_server.metrics import ServerMetrics
from fedlora_server.phases import PhaseName
from fedlora_server.planning import RoundPlans
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.store import CoordinatorStore
from fedlora_server.versions import GlobalModel, Versions

__all__ = ["Coordinator", "GlobalModel", "PhaseName", "build_aggregator"]


def build_aggregator(settings: RunSettings, privacy: ClientPrivacy | None, metrics: ServerMetrics) -> Aggregator:
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
    # DP-FedAvg averages unweighted: an example count would scale a site's influence past the clip.
    plain = PlainAggregator(
        weighting="examples" if privacy is None else "uniform",
        max_examples=settings.max_examples,
        spool_dir=spool_dir,
        metrics=metrics,
    )
    if privacy is None:
        return plain
    return CentralNoise(plain, noise_multiplier=privacy.noise_multiplier, clip_norm=privacy.clip_norm)


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
            ),
            aggregator=build_aggregator(settings, privacy, metrics),
            plans=RoundPlans(settings, privacy),
            privacy=privacy,
            clock=clock,
            spool_dir=settings.state_dir / "spool",
        )
