"""The coordinator's phase machine: what workers and operators ask of a run, over its transitions.

Initialize: one worker uploads the initial global model, which holds no data; evaluating it gives
the base model's held-out loss (round 0). Each training attempt is an aggregation that the
run's aggregator opens; the machine knows the phases and their deadlines and nothing of how
updates combine (fedlora_server.transitions moves the run). Thread-safe; transport-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import structlog

from fedlora_common.blocks import block_groups
from fedlora_common.manifest import Manifest
from fedlora_common.messages import MetricsReport, RunSpec, Task, TaskKind, UploadHeader, UploadKind
from fedlora_server.aggregation import (
    SecureMessage,
)
from fedlora_server.bounds import check_count, check_report, check_upload_numbers
from fedlora_server.config import RunSettings
from fedlora_server.errors import (
    Aborted,
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from fedlora_server.intake import Received, Spool, UploadSink, check_header, check_initial_manifest, receive
from fedlora_server.phases import (
    Admission,
    Committing,
    Evaluation,
    Finished,
    Initialize,
    Training,
)
from fedlora_server.planning import RoundPlans
from fedlora_server.transitions import RunTransitions
from fedlora_server.versions import GlobalModel, check_artifact_config

__all__ = ["PhaseMachine"]

log = structlog.get_logger()


@dataclass(frozen=True)
class _OpenUpload:
    """A stream admitted by its header: where its chunks go, and what to do once it is verified."""

    sink: UploadSink
    accept: Callable[[Received], None]
    fold: Callable[[Received], None] = lambda received: None
    """What may be done with a verified upload before the lock is taken again (folding it into the sum)."""


class PhaseMachine(RunTransitions):
    def join(self, worker_id: str, num_examples: int, *, rank: int = 0, base_precision: str = "") -> RunSpec:
        """`rank` and `base_precision`: what the site trains and loads (0 and empty: the run's own)."""
        check_count("num_examples", num_examples, low=1)
        rank = self._site_rank(rank)
        if base_precision and base_precision not in self._run_spec.allowed_precisions:
            raise PermissionDenied(
                f"base_precision {base_precision!r}: this run allows {', '.join(self._run_spec.allowed_precisions)} "
                "(run.yaml base_precisions); set one of them in worker.yaml"
            )
        with self._transition():
            self._joined[worker_id] = num_examples
            self._ranks[worker_id] = rank
            self._ledger.worker_joined(
                worker_id, num_examples, len(self._joined), rank=rank, base_precision=base_precision
            )
            log.info("worker_joined", worker_id=worker_id, workers=len(self._joined))
            self._advance()
            return self._run_spec

    def _site_rank(self, asked: int) -> int:
        """The rank a joining site trains: the run's unless it asked for less, which only hetlora allows (a site the
        run does not admit as configured: PERMISSION_DENIED, on which a worker exits 2)."""
        spec = self._run_spec
        if spec.mode == "full" or asked == 0 or asked >= spec.lora.rank:
            return spec.lora.rank
        if spec.aggregation != "hetlora":
            raise PermissionDenied(
                f"rank {asked}: this run trains rank {spec.lora.rank} at every site; a site of less rank takes part "
                "only in a run with aggregation: hetlora"
            )
        return asked

    def poll(self, worker_id: str, *, hold_s: float = 0.0) -> Task:
        """The worker's task. With `hold_s`, a poll that would wait is held until the run changes (a phase opens, a
        stage closes) or `hold_s` passes, and answered at once then: no worker learns of its work late. A poll
        that closes a round writes its version first (outside the lock) and answers what follows it."""
        held_until = time.monotonic() + hold_s
        while True:
            with self._transition():
                self._require_joined(worker_id)
                self._advance()
                if self._commit_due():
                    continue  # leaving the block writes it
                task = self._plans.task(
                    self._phase, worker_id, now=self._clock(), uploading=worker_id in self._uploading
                )
                left = held_until - time.monotonic()
                if task.kind is not TaskKind.WAIT or hold_s <= 0:
                    return task
                if left <= 0:  # held as long as asked: the worker may ask again at once
                    return replace(task, retry_after_ms=0)
                self._changed.wait(left)

    def global_model(self, worker_id: str, version: int) -> GlobalModel:
        with self._transition():
            self._require_joined(worker_id)
            current = self._versions.current
            if current is None or current.number != version:
                have = "none" if current is None else str(current.number)
                raise NotFound(f"version {version} is not the current global model (current: {have})")
            return current

    def count_download(self, nbytes: int, chunks: int) -> None:
        with self._transition():
            self._ledger.downloaded(nbytes, chunks)

    def receive_upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> int:
        """Check the header, stream the chunks through the intake into the phase's sink, then accept."""
        limits = self._settings.limits
        with self._transition():
            self._advance()
            if header.run_id != self._settings.run_id:
                raise FailedPrecondition(f"run {header.run_id!r} is not this coordinator's run")
            self._require_joined(header.worker_id)
            check_header(header, chunk_bytes=limits.chunk_bytes, max_update_bytes=limits.max_update_bytes)
            check_upload_numbers(header)
            if header.worker_id in self._uploading:
                # Not ALREADY_EXISTS, which tells a resend its update is in: this one may yet be refused.
                raise Aborted(f"{header.worker_id} is still uploading on another stream; retry once it ended")
            with self._blame(header.worker_id):
                upload = self._open_upload(header)
            opened_in = self._state_key()
            self._uploading.add(header.worker_id)
            log.info("upload_opened", worker_id=header.worker_id, round=header.round, kind=header.kind.name.lower())
        try:
            received = receive(header, chunks, upload.sink, chunk_bytes=limits.chunk_bytes, metrics=self._metrics)
        except CoordinatorError as exc:
            log.warning("upload_rejected", worker_id=header.worker_id, round=header.round, reason=str(exc))
            if isinstance(exc, Unavailable):
                with self._transition():
                    self._storage_fault(str(exc), attempt=opened_in)
            raise
        finally:
            with self._transition():
                self._uploading.discard(header.worker_id)
        fault: BaseException | None = None
        try:  # outside the lock: a 168 MB fold takes a third of a second, which no other request waits for
            upload.fold(received)
        except BaseException as exc:  # judged under the lock below, as if it happened there
            fault = exc
        with self._transition():
            try:
                if self._state_key()[:3] != opened_in[:3]:
                    raise FailedPrecondition("the round closed while the upload was streaming")
                with self._blame(header.worker_id):
                    if fault is not None:
                        raise fault
                    upload.accept(received)
            except BaseException:
                upload.sink.abort()
                self._metrics.discarded_bytes.inc(received.size_bytes)
                raise
            self._metrics.received_bytes.inc(received.size_bytes)
            self._metrics.received_chunks.inc(received.chunks)
            return header.round

    def secure_message(self, worker_id: str, tag: int, message: SecureMessage) -> None:
        with self._transition():
            self._require_joined(worker_id)
            self._advance()
            phase = self._phase
            if not isinstance(phase, Training):
                raise FailedPrecondition(f"no secure aggregation is open (phase {phase.name})")
            with self._blame(worker_id):
                phase.aggregation.receive(worker_id, tag, message)
            log.info("secagg_received", worker_id=worker_id, message=type(message).__name__, round=phase.record.round)
            self._advance()

    def report_metrics(self, report: MetricsReport) -> None:
        check_report(report)
        with self._transition():
            self._advance()
            phase = self._phase
            if not isinstance(phase, Evaluation) or report.round != phase.round:
                raise FailedPrecondition(f"no evaluation of round {report.round} is open")
            if report.version != phase.model.number:
                raise FailedPrecondition(f"version {report.version} is not the version under evaluation")
            if report.worker_id not in phase.participants:
                raise PermissionDenied(f"{report.worker_id} is not evaluating round {phase.round}")
            if report.worker_id in phase.done:  # taken once: a resend cannot rewrite what the round recorded
                raise AlreadyExists(f"{report.worker_id} already reported on version {report.version}")
            self._ledger.metrics_reported(phase.round, report)
            phase.done.add(report.worker_id)
            log.info("metrics_reported", worker_id=report.worker_id, round=phase.round)
            self._advance()

    def leave(self, worker_id: str, reason: str) -> None:
        """A worker cannot go on: drop it at once, and end the run when too few remain to finish it."""
        reason = " ".join(reason.split())[:500] or "no reason given"
        with self._transition():
            self._require_joined(worker_id)
            del self._joined[worker_id]
            self._ledger.worker_left(worker_id, reason, workers=len(self._joined))
            log.warning("worker_left", worker_id=worker_id, reason=reason, workers=len(self._joined))
            phase = self._phase
            if isinstance(phase, Training):
                phase.aggregation.drop(worker_id)
            elif isinstance(phase, Evaluation):
                phase.participants = tuple(w for w in phase.participants if w != worker_id)
            if not isinstance(phase, (Admission, Finished)) and len(self._joined) < self._settings.min_workers:
                left = "; ".join(f"{w}: {why}" for w, why in self._ledger.departures().items())
                self._fail_run(
                    phase, f"{len(self._joined)} of the {self._settings.min_workers} workers needed remain ({left})"
                )
            elif isinstance(phase, Initialize) and phase.initializer == worker_id:
                self._start_initialize(exclude={worker_id})
            self._advance()

    def amend(self, settings: RunSettings) -> None:
        """Amended settings hold from now on: more rounds, another min_workers, the allow-list (a site added takes
        part from the next attempt; the one in progress keeps its participants)."""
        with self._transition():
            self._settings = settings
            self._plans = RoundPlans(settings, self.privacy)
            self._run_spec = settings.run_spec()
            self._aggregator.allow(
                {w.id: bytes.fromhex(w.identity_public) for w in settings.workers if w.identity_public}
            )
            self._advance()

    def stop(self, *, now: bool, reason: str) -> None:
        """An operator ends the run: after the round in progress, or `now` (the attempt in progress is dropped);
        the last committed round stands and the workers are told the run is finished."""
        with self._transition():
            self._stop = " ".join(reason.split())[:500] or "the operator stopped the run"
            phase = self._phase
            if isinstance(phase, Finished):
                return
            if isinstance(phase, Committing):  # the version being written stands; then the run ends (now) or
                phase.stop_now = phase.stop_now or now  # after its evaluation
                return
            if isinstance(phase, Training):
                if not now:
                    return
                self._ledger.failed(phase.record, dropped=(), excluded=(), reason=f"stopped: {self._stop}")
                phase.aggregation.discard()
            elif isinstance(phase, Evaluation) and not now:
                return
            self._stopped()

    def _open_upload(self, header: UploadHeader) -> _OpenUpload:
        phase = self._phase
        if header.kind is UploadKind.INITIAL:
            if not isinstance(phase, Initialize):
                raise FailedPrecondition("the initial model is already set")
            if header.worker_id != phase.initializer:
                raise PermissionDenied(f"{header.worker_id} was not asked to initialize the run")
            if header.manifest is None or not header.manifest.tensors or not header.artifact_config_json:
                raise InvalidArgument("an initial upload needs a manifest and an artifact config")
            check_initial_manifest(header.manifest)
            if self._settings.aggregation == "hetlora":  # every LoRA tensor must have a rank axis to pad
                try:
                    block_groups(header.manifest, rank=self._settings.lora.rank, heterogeneous=True)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
            check_artifact_config(header.artifact_config_json)
            if header.total_size != header.manifest.nbytes:
                raise InvalidArgument(
                    f"total_size {header.total_size} != {header.manifest.nbytes} bytes the manifest needs"
                )
            spool = Spool(self._spool_dir / f"initial-{header.worker_id}.part")
            manifest = header.manifest
            return _OpenUpload(spool, lambda received: self._accept_initial(header, spool, manifest))
        if not isinstance(phase, Training):
            raise FailedPrecondition(f"round {header.round} is not accepting updates (phase {phase.name})")
        sink = phase.aggregation.open_upload(header)
        return _OpenUpload(
            sink,
            lambda received: self._accept_update(phase, header, sink, received),
            lambda received: phase.aggregation.fold(header, sink, received),
        )

    def _accept_initial(self, header: UploadHeader, spool: Spool, manifest: Manifest) -> None:
        vector = spool.read(np.float32)
        spool.discard()
        model = self._versions.commit_initial(vector, header.artifact_config_json, manifest)
        log.info("initialized", worker_id=header.worker_id, numel=manifest.numel)
        self._start_evaluate(model, record=None)

    def _accept_update(self, phase: Training, header: UploadHeader, sink: UploadSink, received: Received) -> None:
        weight = phase.aggregation.accept(header, sink, received)
        self._ledger.upload_accepted(phase.record, header, weight, received)
        log.info("update_accepted", worker_id=header.worker_id, round=header.round, bytes=received.size_bytes)
        self._advance()
