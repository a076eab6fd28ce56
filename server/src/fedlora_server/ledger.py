"""What the run records about its rounds: written to the store first, then exported to Prometheus.

The phase machine decides; the ledger keeps the books of each decision (attempts started,
uploads accepted, commits, failures, evaluations) and the figures derived from them (train and
held-out loss, bytes, privacy spent, memorization), so the report and a resumed coordinator
read the same history.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from fedlora_common.memorization import RATE_FIELDS, memorization_to_json
from fedlora_common.messages import MetricsReport, UploadHeader
from fedlora_server.errors import AlreadyExists
from fedlora_server.intake import Received
from fedlora_server.memorization import combine_reports
from fedlora_server.metrics import ServerMetrics
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.store import (
    CoordinatorStore,
    DuplicateUploadError,
    MetricsRecord,
    RoundRecord,
    RunEvent,
    RunRecord,
    StateError,
    UploadRecord,
    WorkerRecord,
)

__all__ = ["RoundLedger"]


class RoundLedger:
    def __init__(
        self,
        *,
        store: CoordinatorStore,
        metrics: ServerMetrics,
        privacy: ClientPrivacy | None,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._privacy = privacy
        self._clock = clock
        self._download_bytes = 0

    def stored_run(self) -> RunRecord | None:
        return self._store.load_run()

    def open_run(self, run: RunRecord) -> RunRecord | None:
        """Start or resume the run; attempts a crash left open are marked failed. Returns the stored run, if any."""
        existing = self._store.load_run()
        if existing is not None and existing.run_id != run.run_id:
            raise StateError(
                f"the state directory holds run {existing.run_id!r}, not {run.run_id!r}: "
                "point state_dir elsewhere for a new run"
            )
        self._store.create_run(run)
        if existing is not None:
            for record in self._store.rounds():
                if record.status == "training":
                    self._store.save_round(replace(record, status="failed", finished_at=self._clock()))
        return existing

    def worker_joined(self, worker_id: str, num_examples: int, workers: int, *, rank: int, base_precision: str) -> None:
        self._store.upsert_worker(
            WorkerRecord(worker_id, num_examples, self._clock(), rank=rank, base_precision=base_precision)
        )
        self._metrics.workers_connected.set(workers)

    def worker_left(self, worker_id: str, reason: str, *, workers: int) -> None:
        record = next(w for w in self._store.workers() if w.worker_id == worker_id)
        self._store.upsert_worker(replace(record, left_reason=reason))
        self._metrics.workers_connected.set(workers)
        self._metrics.workers_left.inc()

    def departures(self) -> dict[str, str]:
        """Workers that said they could not go on, and why."""
        return {w.worker_id: w.left_reason for w in self._store.workers() if w.left_reason}

    def run_failed(self, reason: str) -> None:
        self._store.fail_run(reason)

    def exclusions(self) -> dict[int, set[str]]:
        """Per round, the workers its attempts showed at fault: they sit out the rest of that round."""
        excluded: dict[int, set[str]] = {}
        for record in self._store.rounds():
            if record.excluded:
                excluded.setdefault(record.round, set()).update(record.excluded)
        return excluded

    def attempts_since(self, round_: int, since: float) -> int:
        """Attempts of `round_` started at or after `since` (the run's last retry): what its attempt cap counts."""
        return sum(1 for r in self._store.rounds() if r.round == round_ and r.started_at >= since)

    def events(self) -> list[RunEvent]:
        return self._store.events()

    def last_attempt(self, round_: int) -> RoundRecord | None:
        attempts = [r for r in self._store.rounds() if r.round == round_]
        return attempts[-1] if attempts else None

    def attempt_started(self, round_: int, participants: tuple[str, ...], deadline_s: float) -> RoundRecord:
        last = self.last_attempt(round_)
        now = self._clock()
        record = RoundRecord(
            round=round_,
            attempt=1 if last is None else last.attempt + 1,
            status="training",
            participants=participants,
            started_at=now,
            deadline_at=now + deadline_s,
        )
        self._store.save_round(record)
        self._metrics.rounds_started.inc()
        self._metrics.current_round.set(round_)
        self._metrics.round_attempt.set(record.attempt)
        self._metrics.round_backoff.set(0)
        return record

    def upload_accepted(self, record: RoundRecord, header: UploadHeader, weight: int, received: Received) -> None:
        upload = UploadRecord(
            record.round,
            record.attempt,
            header.worker_id,
            weight,
            received.size_bytes,
            received.sha256.hex(),
            header.train_loss,
        )
        try:
            self._store.record_upload(upload)
        except DuplicateUploadError as exc:
            raise AlreadyExists(str(exc)) from None

    def committed(
        self,
        record: RoundRecord,
        *,
        dropped: tuple[str, ...],
        secagg: dict[str, object] | None,
        excluded: tuple[str, ...] = (),
    ) -> RoundRecord:
        """The attempt's new version is committed: its train loss (weighted as uploads were recorded), bytes,
        and the participants it showed to have lied though it completed without them."""
        uploads = self._store.uploads(record.round, record.attempt)
        weights = np.array([u.num_examples for u in uploads], dtype=np.float64)
        train_loss = float(np.average([u.train_loss for u in uploads], weights=weights)) if uploads else None
        committed = replace(
            record,
            status="evaluating",
            dropped=dropped,
            secagg=json.dumps(secagg) if secagg is not None else "",
            train_loss=train_loss,
            upload_bytes=sum(u.size_bytes for u in uploads),
            excluded=excluded,
        )
        self._store.save_round(committed)
        self._metrics.excluded_workers.inc(len(excluded))
        if train_loss is not None:
            self._metrics.train_loss.set(train_loss)
        if self._privacy is not None:
            self._metrics.dp_epsilon.labels(level="client").set(self._privacy.epsilon_after(record.round))
        self._metrics.phase_seconds.labels(phase="train").observe(self._clock() - record.started_at)
        return committed

    def failed(self, record: RoundRecord, *, dropped: tuple[str, ...], excluded: tuple[str, ...], reason: str) -> None:
        failed = replace(
            record, status="failed", finished_at=self._clock(), dropped=dropped, excluded=excluded, failure=reason
        )
        self._store.save_round(failed)
        self._metrics.rounds_failed.inc()
        self._metrics.excluded_workers.inc(len(excluded))

    def downloaded(self, nbytes: int, chunks: int) -> None:
        self._download_bytes += nbytes
        self._metrics.sent_bytes.inc(nbytes)
        self._metrics.sent_chunks.inc(chunks)

    def metrics_reported(self, round_: int, report: MetricsReport) -> None:
        memorization = json.dumps(memorization_to_json(report.memorization)) if report.memorization else ""
        self._store.record_metrics(
            MetricsRecord(
                round_,
                report.worker_id,
                report.version,
                report.eval_loss,
                report.eval_tokens,
                report.train_loss,
                report.tokens_per_second,
                report.record_epsilon,
                memorization,
            )
        )

    def evaluated(
        self,
        round_: int,
        record: RoundRecord | None,
        *,
        participants: tuple[str, ...],
        started_at: float,
        deadline_at: float,
    ) -> float | None:
        """Close a round's evaluation (round 0 has no attempt record: it is the base model); its held-out loss."""
        reports = self._store.metrics(round_)
        evaluated = [m for m in reports if m.eval_tokens > 0]
        eval_loss = None
        if evaluated:
            tokens = np.array([m.eval_tokens for m in evaluated], dtype=np.float64)
            eval_loss = float(np.average([m.eval_loss for m in evaluated], weights=tokens))
            self._metrics.eval_loss.set(eval_loss)
        now = self._clock()
        self._metrics.phase_seconds.labels(phase="evaluate").observe(now - started_at)
        self._export_privacy_and_audit(reports)
        if record is None:
            self._store.save_round(
                RoundRecord(
                    round=0,
                    attempt=0,
                    status="completed",
                    participants=participants,
                    started_at=started_at,
                    deadline_at=deadline_at,
                    finished_at=now,
                    eval_loss=eval_loss,
                )
            )
            return eval_loss
        # Downloads count towards the round whose evaluation they fall in: mostly this round's new version.
        completed = replace(
            record, status="completed", finished_at=now, eval_loss=eval_loss, download_bytes=self._download_bytes
        )
        self._store.save_round(completed)
        self._download_bytes = 0
        self._metrics.rounds_completed.inc()
        return eval_loss

    def _export_privacy_and_audit(self, reports: Sequence[MetricsRecord]) -> None:
        spent = [m.record_epsilon for m in reports if m.record_epsilon is not None]
        if spent:
            self._metrics.dp_epsilon.labels(level="record").set(max(spent))
        combined = combine_reports(reports)
        if combined is None:
            return
        for group, rates in {"trained": combined.overall, **combined.by_duplication}.items():
            if rates is None:
                continue
            for name in RATE_FIELDS:
                self._metrics.memorization_rate.labels(group=group, metric=name).set(getattr(rates, name))
