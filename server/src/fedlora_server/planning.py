"""What the coordinator hands out: the plans on the wire, derived from the run's settings, and each worker's task
in each phase."""

from __future__ import annotations

from fedlora_common.messages import Task, TaskKind
from fedlora_common.plans import AuditPlan, TrainingPlan
from fedlora_server.config import RunSettings
from fedlora_server.phases import Backoff, Evaluation, Finished, Initialize, Phase, Training, round_of
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

    def task(self, phase: Phase, worker: str, *, now: float, uploading: bool) -> Task:
        """What `worker` is to do in `phase` (a joined worker; `uploading`: one of its uploads is still streaming)."""
        wait = Task(TaskKind.WAIT, round=round_of(phase), retry_after_ms=self._settings.timeouts.poll_wait_ms)
        if isinstance(phase, Finished):
            return Task(TaskKind.FINISHED, round=phase.round, reason=phase.reason)
        if isinstance(phase, Backoff):
            resume_ms = max(0, round((phase.resume_at - now) * 1000))
            return Task(TaskKind.WAIT, round=phase.round, retry_after_ms=min(wait.retry_after_ms, resume_ms))
        if uploading:
            return wait
        if isinstance(phase, Initialize) and worker == phase.initializer:
            return Task(
                TaskKind.INITIALIZE, round=0, participants=(worker,), deadline_s=max(0.0, phase.deadline_at - now)
            )
        if isinstance(phase, Training) and worker in phase.record.participants:
            ask = phase.aggregation.ask(worker)
            if ask is None:
                return wait
            return Task(
                ask.kind,
                round=phase.record.round,
                global_version=phase.base.version,
                training=self.training(phase.record.round),
                participants=phase.record.participants,
                deadline_s=max(0.0, phase.aggregation.deadline_at - now),
                secagg=ask.secagg,
            )
        if isinstance(phase, Evaluation) and worker in phase.participants and worker not in phase.done:
            return Task(
                TaskKind.EVALUATE,
                round=phase.round,
                global_version=phase.model.version,
                training=self.training(phase.round),
                participants=phase.participants,
                deadline_s=max(0.0, phase.deadline_at - now),
                audit=self.audit(phase.round),
            )
        return wait
