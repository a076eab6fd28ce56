"""What the coordinator hands out each round, derived from the run's settings: the plans on the wire."""

from __future__ import annotations

from fedlora_common.plans import AuditPlan, TrainingPlan
from fedlora_server.config import RunSettings
from fedlora_server.privacy import ClientPrivacy

__all__ = ["RoundPlans"]


class RoundPlans:
    def __init__(self, settings: RunSettings, privacy: ClientPrivacy | None) -> None:
        self._settings = settings
        self._privacy = privacy

    def training(self, round_: int) -> TrainingPlan:
        """The run's training settings, a seed for this round, and the privacy the sites train with.

        Under client-level DP every site clips its update to the DP clip norm, whatever
        `training.update_clip_norm` says: that bound is what the noise is calibrated to. The
        learning-rate schedule spans the run's rounds x local_steps and round r (from 1) takes its
        steps from (r - 1) x local_steps on, so a retried attempt gets the same stretch.
        """
        s = self._settings
        clip = s.training.update_clip_norm if self._privacy is None else self._privacy.clip_norm
        steps = s.training.local_steps
        return TrainingPlan(
            **s.training.model_dump(exclude={"update_clip_norm"}),
            update_clip_norm=clip,
            seed=s.seed * 1_000_003 + round_,
            goldfish=s.privacy.goldfish,
            record_dp=s.privacy.record_dp,
            schedule_start=max(round_ - 1, 0) * steps,
            schedule_steps=max(s.rounds, round_) * steps,
        )

    def audit(self, round_: int) -> AuditPlan | None:
        """Audit every `every`-th round and the last; round 0 (the base model) is not audited."""
        audit, last = self._settings.audit, self._settings.rounds
        if audit is None or round_ == 0 or (round_ % audit.every and round_ != last):
            return None
        return audit.plan()
