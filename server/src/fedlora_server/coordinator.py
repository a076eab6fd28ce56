"""The round logic of the coordinator, free of any transport.

Phases of a run: admission -> initialize (one worker uploads the initial global model,
which holds no data) -> evaluate version 0 (the base model's held-out loss) -> for each
round: train (uploads folded into one accumulator) -> commit -> evaluate -> ... -> finished.
Every decision is written to the store before any worker can observe it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog

from fedlora_common.aggregation import StreamingAccumulator, apply_update
from fedlora_common.manifest import MASKED_DTYPE, WIRE_DTYPE, Manifest, update_manifest
from fedlora_common.memorization import RATE_FIELDS, memorization_to_json
from fedlora_common.messages import (
    AuditPlan,
    MetricsReport,
    ModelVersion,
    RunSpec,
    SecAggTask,
    Task,
    TaskKind,
    TrainingPlan,
    UploadHeader,
    UploadKind,
)
from fedlora_common.privacy import central_noise, plan_distributed_noise
from fedlora_common.secagg import (
    Advertisement,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    dequantize_sum,
    max_bits,
    round_tag,
)
from fedlora_server.artifacts import load_artifact, point_latest, write_artifact
from fedlora_server.config import RunSettings
from fedlora_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from fedlora_server.memorization import combine_reports
from fedlora_server.metrics import ServerMetrics
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.secure_round import RoundFailed, SecureRound
from fedlora_server.store import (
    ArtifactRecord,
    CoordinatorStore,
    DuplicateUploadError,
    MetricsRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
    WorkerRecord,
)
from fedlora_server.upload import ReceivedUpload, receive_to_spool

__all__ = ["Coordinator", "GlobalModel", "PhaseName"]

PhaseName = Literal["admission", "initialize", "train", "evaluate", "finished"]
log = structlog.get_logger()


@dataclass(frozen=True)
class GlobalModel:
    """A committed version, held in memory to stream to workers."""

    version: ModelVersion
    vector: npt.NDArray[np.float32]
    config_json: str
    round: int


@dataclass
class _Phase:
    name: PhaseName
    round: int = 0
    attempt: int = 0
    participants: tuple[str, ...] = ()
    started_at: float = 0.0
    deadline_at: float = float("inf")
    done: set[str] = field(default_factory=set)


class Coordinator:
    """Schedules rounds and aggregates updates. Thread-safe; every method is transport-free."""

    def __init__(
        self,
        *,
        settings: RunSettings,
        store: CoordinatorStore,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.RLock()
        self._finished = threading.Event()
        self._artifacts_dir = settings.state_dir / "artifacts"
        self._spool_dir = settings.state_dir / "spool"
        self._joined: dict[str, int] = {}
        self._global: GlobalModel | None = None
        self._accumulator: StreamingAccumulator | None = None
        self._secure: SecureRound | None = None
        self._secure_stats: dict[str, dict[str, float]] = {}
        self._stage_started = 0.0
        self._phase = _Phase("admission", deadline_at=clock() + settings.timeouts.admission_s)
        self._uploads_in_flight: set[str] = set()
        self._download_bytes = 0
        self._privacy = ClientPrivacy.from_settings(settings)
        self._resume()

    # ---- what workers ask -------------------------------------------------------------

    @property
    def run_spec(self) -> RunSpec:
        return self._settings.run_spec()

    @property
    def phase(self) -> PhaseName:
        return self._phase.name

    @property
    def finished(self) -> threading.Event:
        return self._finished

    def join(self, worker_id: str, num_examples: int) -> RunSpec:
        if num_examples <= 0:
            raise InvalidArgument("num_examples must be positive")
        with self._lock:
            self._store.upsert_worker(WorkerRecord(worker_id, num_examples, self._clock()))
            self._joined[worker_id] = num_examples
            self._metrics.workers_connected.set(len(self._joined))
            log.info("worker_joined", worker_id=worker_id, workers=len(self._joined))
            self._advance()
            return self.run_spec

    def poll(self, worker_id: str) -> Task:
        with self._lock:
            self._require_joined(worker_id)
            self._advance()
            phase = self._phase
            wait = Task(TaskKind.WAIT, round=phase.round, retry_after_ms=self._settings.timeouts.poll_wait_ms)
            if phase.name == "finished":
                return Task(TaskKind.FINISHED, round=phase.round)
            if worker_id not in phase.participants or worker_id in phase.done:
                return wait
            if worker_id in self._uploads_in_flight:
                return wait
            deadline_s = max(0.0, phase.deadline_at - self._clock())
            if phase.name == "initialize":
                return Task(TaskKind.INITIALIZE, round=0, participants=phase.participants, deadline_s=deadline_s)
            assert self._global is not None
            kind = TaskKind.TRAIN if phase.name == "train" else TaskKind.EVALUATE
            secagg = None
            if kind is TaskKind.TRAIN and self._secure is not None:
                found = self._secure_task(worker_id)
                if found is None:
                    return wait
                kind, secagg = found
            return Task(
                kind,
                round=phase.round,
                global_version=self._global.version,
                training=self._training_plan(phase.round),
                participants=phase.participants,
                deadline_s=deadline_s,
                secagg=secagg,
                audit=self._audit_plan(phase.round) if kind is TaskKind.EVALUATE else None,
            )

    def global_model(self, worker_id: str, version: int) -> GlobalModel:
        with self._lock:
            self._require_joined(worker_id)
            current = self._global
            if current is None or current.version.version != version:
                have = "none" if current is None else str(current.version.version)
                raise NotFound(f"version {version} is not the current global model (current: {have})")
            return current

    def count_download(self, nbytes: int, chunks: int) -> None:
        with self._lock:
            self._download_bytes += nbytes
        self._metrics.sent_bytes.inc(nbytes)
        self._metrics.sent_chunks.inc(chunks)

    def receive_upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> int:
        """Validate, spool and fold one update; return the round it counted for."""
        with self._lock:
            self._advance()
            expected = self._check_upload_header(header)
            self._uploads_in_flight.add(header.worker_id)
        key = f"r{header.round:04d}-{header.worker_id}-{threading.get_ident()}.part"
        try:
            received = receive_to_spool(
                self._counted(chunks),
                spool_path=self._spool_dir / key,
                total_size=header.total_size,
                declared_chunks=header.chunk_count,
                declared_sha256=header.sha256,
                max_chunk_bytes=self._settings.limits.chunk_bytes,
                dtype=header.dtype,
            )
        except (InvalidArgument, ResourceExhausted) as exc:
            self._metrics.rejected_uploads.labels(reason=type(exc).__name__).inc()
            log.warning("upload_rejected", worker_id=header.worker_id, round=header.round, reason=str(exc))
            raise
        finally:
            with self._lock:
                self._uploads_in_flight.discard(header.worker_id)
        try:
            with self._lock:
                if self._phase_key() != expected:
                    raise FailedPrecondition("the round closed while the upload was streaming")
                if header.kind is UploadKind.INITIAL:
                    self._accept_initial(header, received)
                elif header.kind is UploadKind.MASKED:
                    self._accept_masked(header, received)
                else:
                    self._accept_delta(header, received)
                return header.round
        finally:
            received.discard()

    # ---- secure aggregation ------------------------------------------------------------

    def advertise_keys(self, worker_id: str, tag: int, ad: Advertisement) -> None:
        if ad.worker_id != worker_id:
            raise PermissionDenied(f"{worker_id} cannot advertise keys for {ad.worker_id}")
        with self._lock:
            secure = self._secure_for(tag)
            secure.advertise(ad)
            self._count_stage_bytes("advertise", len(ad.mask_public) + len(ad.enc_public) + len(ad.signature))
            self._advance()

    def share_keys(self, worker_id: str, tag: int, shares: Sequence[EncryptedShare]) -> None:
        with self._lock:
            secure = self._secure_for(tag)
            secure.submit_shares(worker_id, shares)
            self._count_stage_bytes("share", sum(len(s.ciphertext) for s in shares))
            self._advance()

    def reveal_shares(self, worker_id: str, tag: int, reveals: Sequence[RevealedShare]) -> None:
        with self._lock:
            secure = self._secure_for(tag)
            secure.submit_reveal(worker_id, reveals)
            self._count_stage_bytes("unmask", sum(len(r.share) for r in reveals))
            self._advance()

    def _secure_for(self, tag: int) -> SecureRound:
        self._advance()
        if self._phase.name != "train" or self._secure is None:
            raise FailedPrecondition(f"no secure aggregation is open (phase {self._phase.name})")
        if tag != self._secure.params.tag:
            raise FailedPrecondition(
                f"message for session tag {tag}; the open round attempt is {self._secure.params.tag} "
                "(replayed from another round or attempt?)"
            )
        return self._secure

    def _new_secure_round(self, round_: int, attempt: int, participants: tuple[str, ...]) -> SecureRound:
        s = self._settings.secure_aggregation
        n = len(participants)
        threshold = SecAggParams.threshold_for(n, s.threshold_fraction)
        bits, clip_range, max_examples, noise_variance = s.bits or max_bits(n), s.clip_range, s.max_examples, 0.0
        if self._privacy is not None:
            # Distributed DP: unweighted mean of updates clipped to C, each carrying Skellam noise.
            noise = plan_distributed_noise(
                participants=n,
                threshold=threshold,
                noise_multiplier=self._privacy.noise_multiplier,
                clip_norm=self._privacy.clip_norm,
                dimension=self._update_manifest().numel,
            )
            bits, clip_range, max_examples, noise_variance = noise.bits, noise.clip, 1, noise.worker_variance
        params = SecAggParams(
            run_id=self._settings.run_id,
            tag=round_tag(round_, attempt),
            participants=participants,
            threshold=threshold,
            bits=bits,
            clip_range=clip_range,
            max_examples=max_examples,
            noise_variance=noise_variance,
        )
        identities = {w.id: bytes.fromhex(w.identity_public) for w in self._settings.workers if w.identity_public}
        return SecureRound(params=params, identities=identities, numel=self._update_manifest().numel + 1)

    def _secure_task(self, worker_id: str) -> tuple[TaskKind, SecAggTask] | None:
        """What the current secure stage asks of this worker, or None when it has nothing to do."""
        secure = self._secure
        assert secure is not None
        params = secure.params
        if secure.stage == "advertise" and not secure.has_advertised(worker_id):
            return TaskKind.TRAIN, SecAggTask(params)
        if secure.stage == "share" and worker_id in secure.u1 and not secure.has_shared(worker_id):
            return TaskKind.SECAGG_SHARE_KEYS, SecAggTask(params, roster=tuple(secure.roster()))
        if secure.stage == "masked" and worker_id in secure.u2 and not secure.has_masked(worker_id):
            if worker_id in self._uploads_in_flight:
                return None
            inbox = tuple(secure.inbox(worker_id))
            return TaskKind.SECAGG_MASKED_UPLOAD, SecAggTask(params, inbox=inbox, survivors=secure.u2)
        if secure.stage == "unmask" and worker_id in secure.u3 and not secure.has_revealed(worker_id):
            return TaskKind.SECAGG_UNMASK, SecAggTask(params, survivors=secure.u3, dropped=secure.dropped)
        return None

    def _advance_secure(self) -> None:
        """Close the current secure stage (all answered, or its deadline passed)."""
        secure = self._secure
        assert secure is not None
        stage, now = secure.stage, self._clock()
        before = {"advertise": secure.params.participants, "share": secure.u1, "masked": secure.u2, "unmask": secure.u3}
        try:
            if stage == "advertise":
                secure.close_advertise()
                after: tuple[str, ...] = secure.u1
            elif stage == "share":
                secure.close_share()
                after = secure.u2
            elif stage == "masked":
                secure.close_masked()
                after = secure.u3
            else:
                started = time.perf_counter()
                total = secure.finish()
                self._metrics.aggregation_seconds.labels(step="unmask").observe(time.perf_counter() - started)
                after = tuple(w for w in secure.u3 if secure.has_revealed(w))
        except RoundFailed as exc:
            self._record_stage(stage, now, dropouts=len(before[stage]))
            self._fail_round(str(exc))
            return
        self._record_stage(stage, now, dropouts=len(before[stage]) - len(after))
        if secure.stage == "done":
            self._commit_mean(self._dequantized_mean(total))
        else:
            self._phase.deadline_at = now + self._deadline(training=False)
            self._stage_started = now

    def _dequantized_mean(self, total: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
        """sum_u (w_u/M) delta_u / sum_u (w_u/M): the example-weighted mean, from sums alone."""
        assert self._secure is not None
        params = self._secure.params
        weight = float(total[-1])
        if weight <= 0:
            raise InvalidArgument("the securely aggregated weight is zero")
        values = dequantize_sum(total[:-1], clip=params.clip_range, bits=params.bits)
        return (values * (params.max_examples / weight)).astype(np.float32)

    def _record_stage(self, stage: str, now: float, *, dropouts: int) -> None:
        stats = self._secure_stats.setdefault(stage, {"dropouts": 0, "seconds": 0.0, "bytes": 0})
        stats["dropouts"] += dropouts
        stats["seconds"] = round(now - self._stage_started, 3)
        self._metrics.secagg_dropouts.labels(stage=stage).inc(dropouts)
        self._metrics.secagg_stage_seconds.labels(stage=stage).observe(now - self._stage_started)

    def _count_stage_bytes(self, stage: str, nbytes: int) -> None:
        stats = self._secure_stats.setdefault(stage, {"dropouts": 0, "seconds": 0.0, "bytes": 0})
        stats["bytes"] += nbytes
        self._metrics.secagg_bytes.labels(stage=stage).inc(nbytes)

    def report_metrics(self, report: MetricsReport) -> None:
        if not np.isfinite(report.eval_loss):
            raise InvalidArgument("eval_loss must be finite")
        with self._lock:
            self._advance()
            phase = self._phase
            if phase.name != "evaluate" or report.round != phase.round:
                raise FailedPrecondition(f"no evaluation of round {report.round} is open")
            if self._global is None or report.version != self._global.version.version:
                raise FailedPrecondition(f"version {report.version} is not the version under evaluation")
            if report.worker_id not in phase.participants:
                raise PermissionDenied(f"{report.worker_id} is not evaluating round {phase.round}")
            self._store.record_metrics(
                MetricsRecord(
                    phase.round,
                    report.worker_id,
                    report.version,
                    report.eval_loss,
                    report.eval_tokens,
                    report.train_loss,
                    report.tokens_per_second,
                    report.record_epsilon,
                    json.dumps(memorization_to_json(report.memorization)) if report.memorization else "",
                )
            )
            phase.done.add(report.worker_id)
            self._advance()

    def tick(self) -> None:
        """Close phases whose deadline passed; called periodically by the server."""
        with self._lock:
            self._advance()

    # ---- phase machine ----------------------------------------------------------------

    def _advance(self) -> None:
        """Move through every phase transition that is due now (caller holds the lock)."""
        while True:
            before = self._state_key()
            self._step()
            if self._state_key() == before:
                return

    def _state_key(self) -> tuple[str, int, int, str]:
        secure = self._secure.stage if self._secure is not None else ""
        return (self._phase.name, self._phase.round, self._phase.attempt, secure)

    def _step(self) -> None:
        phase, now = self._phase, self._clock()
        expired = now >= phase.deadline_at
        if phase.name == "admission":
            if len(self._joined) >= self._settings.min_workers:
                self._leave_admission()
            elif expired:
                log.warning("admission_waiting", joined=len(self._joined), needed=self._settings.min_workers)
                phase.deadline_at = now + self._settings.timeouts.admission_s
        elif phase.name == "initialize" and expired:
            self._start_initialize(exclude=set(phase.participants))
        elif phase.name == "train" and self._secure is not None:
            if self._secure.ready() or expired:
                self._advance_secure()
        elif phase.name == "train":
            if set(phase.participants) <= phase.done:
                self._commit_round()
            elif expired:
                if len(phase.done) >= self._settings.min_workers:
                    self._commit_round()
                else:
                    self._fail_round(f"{len(phase.done)} of {len(phase.participants)} updates by the deadline")
        elif phase.name == "evaluate" and (set(phase.participants) <= phase.done or expired):
            self._close_evaluation()

    def _leave_admission(self) -> None:
        latest = self._store.latest_artifact()
        if latest is None:
            self._start_initialize(exclude=set())
            return
        last = self._last_attempt(latest.round)
        if last is not None and last.status == "completed":
            self._start_next_round_or_finish(latest.round)
        else:
            self._start_evaluate(latest.round)

    def _start_initialize(self, *, exclude: set[str]) -> None:
        candidates = sorted(set(self._joined) - exclude) or sorted(self._joined)
        self._phase = _Phase(
            "initialize",
            participants=(candidates[0],),
            started_at=self._clock(),
            deadline_at=self._clock() + self._deadline(training=True),
        )
        log.info("initialize", initializer=candidates[0])

    def _start_train(self, round_: int) -> None:
        attempt = 1 + max((r.attempt for r in self._store.rounds() if r.round == round_), default=0)
        now = self._clock()
        record = RoundRecord(
            round=round_,
            attempt=attempt,
            status="training",
            participants=tuple(sorted(self._joined)),
            started_at=now,
            deadline_at=now + self._deadline(training=True),
        )
        self._store.save_round(record)
        if self._settings.secure_aggregation.enabled:
            self._secure = self._new_secure_round(round_, attempt, record.participants)
            self._secure_stats = {}
            self._stage_started = now
        else:
            self._accumulator = StreamingAccumulator(self._update_manifest().numel)
        self._phase = _Phase("train", round_, attempt, record.participants, now, record.deadline_at)
        self._metrics.rounds_started.inc()
        self._metrics.current_round.set(round_)
        log.info("round_started", round=round_, attempt=attempt, participants=len(record.participants))

    def _start_evaluate(self, round_: int) -> None:
        now = self._clock()
        self._phase = _Phase(
            "evaluate",
            round_,
            self._phase.attempt,
            tuple(sorted(self._joined)),
            now,
            now + self._deadline(training=True),
        )

    def _start_next_round_or_finish(self, completed_round: int) -> None:
        budget_spent = self._privacy is not None and not self._privacy.allows(completed_round + 1)
        if completed_round >= self._settings.rounds or budget_spent:
            self._phase = _Phase("finished", completed_round)
            self._finished.set()
            if budget_spent and completed_round < self._settings.rounds:
                log.warning("privacy_budget_reached", rounds=completed_round, planned=self._settings.rounds)
            log.info("run_finished", rounds=completed_round)
        else:
            self._start_train(completed_round + 1)

    def _commit_round(self) -> None:
        assert self._accumulator is not None
        mean = self._accumulator.mean()
        if self._privacy is not None:
            # Central DP: (sum + N(0, (zC)^2)) / n, with noise nobody can predict (not the run's seed).
            std = self._privacy.noise_multiplier * self._privacy.clip_norm / len(self._phase.done)
            noise = central_noise(mean.size, std=std, rng=np.random.default_rng(secrets.randbits(128)))
            mean = (mean + noise).astype(np.float32)
        self._commit_mean(mean)

    def _commit_mean(self, mean_delta: npt.NDArray[np.float32]) -> None:
        phase = self._phase
        assert self._global is not None
        started = time.perf_counter()
        manifest = self._global.version.manifest
        vector = apply_update(self._global.vector, manifest, self._update_manifest(), mean_delta)
        self._commit_version(vector, self._global.config_json, phase.round)
        self._metrics.aggregation_seconds.labels(step="commit").observe(time.perf_counter() - started)
        uploads = self._store.uploads(phase.round, phase.attempt)
        weights = np.array([u.num_examples for u in uploads], dtype=np.float64)
        train_loss = float(np.average([u.train_loss for u in uploads], weights=weights))
        survivors = set(self._secure.u3) if self._secure is not None else phase.done
        record = self._last_attempt(phase.round)
        assert record is not None
        self._store.save_round(
            replace(
                record,
                status="evaluating",
                dropped=tuple(sorted(set(phase.participants) - survivors)),
                secagg=json.dumps(self._secure_stats) if self._secure is not None else "",
                train_loss=train_loss,
                upload_bytes=sum(u.size_bytes for u in uploads),
            )
        )
        self._metrics.train_loss.set(train_loss)
        if self._privacy is not None:
            self._metrics.dp_epsilon.labels(level="client").set(self._privacy.epsilon_after(phase.round))
        self._metrics.phase_seconds.labels(phase="train").observe(self._clock() - phase.started_at)
        self._accumulator = None
        self._secure = None
        log.info("round_committed", round=phase.round, updates=len(uploads), train_loss=train_loss)
        self._start_evaluate(phase.round)

    def _fail_round(self, reason: str) -> None:
        phase = self._phase
        record = self._last_attempt(phase.round)
        assert record is not None
        self._store.save_round(
            replace(record, status="failed", finished_at=self._clock(), dropped=self._missing(phase))
        )
        self._metrics.rounds_failed.inc()
        log.warning("round_failed", round=phase.round, attempt=phase.attempt, reason=reason)
        self._accumulator = None
        self._secure = None
        self._start_train(phase.round)

    def _close_evaluation(self) -> None:
        phase = self._phase
        reports = [m for m in self._store.metrics(phase.round) if m.eval_tokens > 0]
        eval_loss = None
        if reports:
            tokens = np.array([m.eval_tokens for m in reports], dtype=np.float64)
            eval_loss = float(np.average([m.eval_loss for m in reports], weights=tokens))
            self._metrics.eval_loss.set(eval_loss)
        self._metrics.phase_seconds.labels(phase="evaluate").observe(self._clock() - phase.started_at)
        self._export_privacy_and_audit(self._store.metrics(phase.round))
        if phase.round > 0:
            record = self._last_attempt(phase.round)
            assert record is not None
            # Downloads count towards the round whose evaluation they fall in: mostly this round's new version.
            completed = replace(
                record,
                status="completed",
                finished_at=self._clock(),
                eval_loss=eval_loss,
                download_bytes=self._download_bytes,
            )
            self._store.save_round(completed)
            self._download_bytes = 0
            self._metrics.rounds_completed.inc()
        else:
            self._store.save_round(
                RoundRecord(
                    round=0,
                    attempt=0,
                    status="completed",
                    participants=phase.participants,
                    started_at=phase.started_at,
                    deadline_at=phase.deadline_at,
                    finished_at=self._clock(),
                    eval_loss=eval_loss,
                )
            )
        log.info("round_evaluated", round=phase.round, eval_loss=eval_loss, reports=len(reports))
        self._start_next_round_or_finish(phase.round)

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

    # ---- uploads ----------------------------------------------------------------------

    def _phase_key(self) -> tuple[str, int, int]:
        return (self._phase.name, self._phase.round, self._phase.attempt)

    def _check_upload_header(self, header: UploadHeader) -> tuple[str, int, int]:
        phase = self._phase
        if header.run_id != self._settings.run_id:
            raise FailedPrecondition(f"run {header.run_id!r} is not this coordinator's run")
        self._require_joined(header.worker_id)
        wire_dtype = MASKED_DTYPE if header.kind is UploadKind.MASKED else WIRE_DTYPE
        if header.dtype != wire_dtype:
            raise InvalidArgument(f"dtype {header.dtype!r} is not supported for this upload; send {wire_dtype}")
        if header.num_examples <= 0:
            raise InvalidArgument("num_examples must be positive")
        if not np.isfinite(header.train_loss):
            raise InvalidArgument("train_loss must be finite")
        if header.total_size > self._settings.limits.max_update_bytes:
            raise ResourceExhausted(
                f"declared {header.total_size} bytes; the limit is {self._settings.limits.max_update_bytes}"
            )
        if len(header.sha256) != 32:
            raise InvalidArgument("sha256 must be 32 bytes")
        if header.kind is UploadKind.INITIAL:
            if phase.name != "initialize":
                raise FailedPrecondition("the initial model is already set")
            if header.worker_id not in phase.participants:
                raise PermissionDenied(f"{header.worker_id} was not asked to initialize the run")
            if header.manifest is None or not header.manifest.tensors or not header.artifact_config_json:
                raise InvalidArgument("an initial upload needs a manifest and an artifact config")
            expected_size = header.manifest.nbytes
        elif header.kind is UploadKind.MASKED:
            secure = self._secure_for(header.tag)
            if header.round != phase.round:
                raise FailedPrecondition(f"round {header.round} is not accepting updates")
            if header.worker_id in self._uploads_in_flight:
                raise AlreadyExists(f"{header.worker_id} is already uploading its masked update")
            numel = header.total_size // 4
            secure.check_masked_upload(header.worker_id, numel)
            expected_size = numel * 4
        else:
            if self._secure is not None:
                raise FailedPrecondition("this run aggregates securely: send a masked update")
            if phase.name != "train" or header.round != phase.round:
                raise FailedPrecondition(f"round {header.round} is not accepting updates (phase {phase.name})")
            if header.worker_id not in phase.participants:
                raise PermissionDenied(f"{header.worker_id} is not a participant of round {phase.round}")
            if header.worker_id in phase.done or header.worker_id in self._uploads_in_flight:
                raise AlreadyExists(f"{header.worker_id} already uploaded round {phase.round}")
            assert self._global is not None
            if header.base_version != self._global.version.version:
                raise FailedPrecondition(
                    f"update computed on version {header.base_version}; "
                    f"the round trains version {self._global.version.version}"
                )
            expected_size = self._update_manifest().nbytes
        if header.total_size != expected_size:
            raise InvalidArgument(f"total_size {header.total_size} != {expected_size} bytes the manifest needs")
        return self._phase_key()

    def _counted(self, chunks: Iterable[tuple[int, bytes]]) -> Iterable[tuple[int, bytes]]:
        for seq, data in chunks:
            self._metrics.received_chunks.inc()
            self._metrics.received_bytes.inc(len(data))
            yield seq, data

    def _accept_initial(self, header: UploadHeader, received: ReceivedUpload) -> None:
        assert header.manifest is not None
        self._validate_artifact_config(header.artifact_config_json)
        self._commit_version(received.read(), header.artifact_config_json, 0, manifest=header.manifest)
        log.info("initialized", worker_id=header.worker_id, numel=header.manifest.numel)
        self._start_evaluate(0)

    def _record_upload(self, header: UploadHeader, received: ReceivedUpload, *, weight: int) -> None:
        phase = self._phase
        record = UploadRecord(
            phase.round,
            phase.attempt,
            header.worker_id,
            weight,
            received.size_bytes,
            received.sha256.hex(),
            header.train_loss,
        )
        try:
            self._store.record_upload(record)
        except DuplicateUploadError as exc:
            raise AlreadyExists(str(exc)) from None

    def _accept_delta(self, header: UploadHeader, received: ReceivedUpload) -> None:
        phase = self._phase
        self._record_upload(header, received, weight=header.num_examples)
        assert self._accumulator is not None
        started = time.perf_counter()
        # DP-FedAvg averages unweighted: an example count would scale a site's influence past the clip.
        weight = 1.0 if self._privacy is not None else float(header.num_examples)
        received.fold_into(self._accumulator, weight)
        self._metrics.aggregation_seconds.labels(step="fold").observe(time.perf_counter() - started)
        phase.done.add(header.worker_id)
        log.info("update_accepted", worker_id=header.worker_id, round=phase.round, bytes=received.size_bytes)
        self._advance()

    def _accept_masked(self, header: UploadHeader, received: ReceivedUpload) -> None:
        phase, secure = self._phase, self._secure
        assert secure is not None
        secure.check_masked_upload(header.worker_id, received.size_bytes // 4)
        # The coordinator never learns a worker's weight here; train losses average unweighted.
        self._record_upload(header, received, weight=1)
        started = time.perf_counter()
        for offset, values in received.slices(np.uint32):
            secure.add_masked(header.worker_id, values, offset)
        secure.close_masked_upload(header.worker_id)
        self._metrics.aggregation_seconds.labels(step="fold").observe(time.perf_counter() - started)
        self._count_stage_bytes("masked", received.size_bytes)
        log.info("masked_update_accepted", worker_id=header.worker_id, round=phase.round, bytes=received.size_bytes)
        self._advance()

    # ---- versions ---------------------------------------------------------------------

    def _commit_version(
        self,
        vector: npt.NDArray[np.float32],
        config_json: str,
        round_: int,
        *,
        manifest: Manifest | None = None,
    ) -> None:
        manifest = manifest or (self._global.version.manifest if self._global else None)
        assert manifest is not None
        number = 0 if self._global is None else self._global.version.version + 1
        artifact = write_artifact(
            self._artifacts_dir,
            number,
            mode=self._settings.mode,
            manifest=manifest,
            vector=vector,
            config_json=config_json,
        )
        self._store.commit_artifact(
            ArtifactRecord(
                number, round_, artifact.sha256.hex(), artifact.size_bytes, str(artifact.path), self._clock()
            )
        )
        point_latest(self._settings.state_dir / "adapter", artifact.path)
        version = ModelVersion(number, artifact.size_bytes, artifact.sha256, manifest)
        self._global = GlobalModel(version, vector, config_json, round_)

    def _validate_artifact_config(self, config_json: str) -> None:
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError:
            raise InvalidArgument("artifact_config_json is not valid JSON") from None
        if not isinstance(config, dict):
            raise InvalidArgument("artifact_config_json must be a JSON object")

    def _update_manifest(self) -> Manifest:
        assert self._global is not None
        return update_manifest(self._global.version.manifest, self._settings.aggregation)

    # ---- helpers ----------------------------------------------------------------------

    def _training_plan(self, round_: int) -> TrainingPlan:
        p = self._settings.privacy
        return TrainingPlan(
            **self._settings.training.model_dump(exclude={"update_clip_norm"}),
            update_clip_norm=self._privacy.clip_norm
            if self._privacy is not None
            else self._settings.training.update_clip_norm,
            seed=self._settings.seed * 1_000_003 + round_,
            goldfish=p.goldfish,
            record_dp=p.record_dp,
        )

    def _audit_plan(self, round_: int) -> AuditPlan | None:
        """Audit every `every`-th round and the last; round 0 (the base model) is not audited."""
        audit = self._settings.audit
        if audit is None or round_ == 0:
            return None
        if round_ % audit.every and round_ != self._settings.rounds:
            return None
        return audit.plan()

    def _deadline(self, *, training: bool) -> float:
        payload = self._global.version.size_bytes if self._global else 0
        return self._settings.timeouts.phase_deadline(2 * payload, training=training).total_seconds()

    def _require_joined(self, worker_id: str) -> None:
        if worker_id not in self._joined:
            raise FailedPrecondition(f"{worker_id} has not joined the run; call Join first")

    def _missing(self, phase: _Phase) -> tuple[str, ...]:
        return tuple(sorted(set(phase.participants) - phase.done))

    def _last_attempt(self, round_: int) -> RoundRecord | None:
        attempts = [r for r in self._store.rounds() if r.round == round_]
        return attempts[-1] if attempts else None

    def _resume(self) -> None:
        """Pick up a run this store already holds, at its last committed version."""
        config_json = self._settings.model_dump_json()
        existing = self._store.load_run()
        self._store.create_run(RunRecord(self._settings.run_id, config_json, self._clock()))
        if existing is None:
            return
        latest = self._store.latest_artifact()
        if latest is not None:
            manifest, vector, artifact_config = load_artifact(Path(latest.path))
            version = ModelVersion(latest.version, latest.size_bytes, bytes.fromhex(latest.sha256), manifest)
            self._global = GlobalModel(version, vector, artifact_config, latest.round)
        for record in self._store.rounds():
            if record.status == "training":
                self._store.save_round(replace(record, status="failed", finished_at=self._clock()))
        log.info("run_resumed", run_id=existing.run_id, version=None if latest is None else latest.version)
