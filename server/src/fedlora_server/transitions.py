"""How a run moves: admission -> initialize -> (train -> commit -> evaluate)* -> finished, and back from the state.

The phase machine's half that no caller drives directly: each transition, the deadlines that close phases,
retries and their backoff, the faults of the coordinator's own storage, and resuming a run from its store
(its exclusions, its journal of operators' requests). Every decision is written to the store (through the
ledger) before any worker can observe it. Thread-safe: callers hold the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import structlog

from fedlora_common.blocks import block_groups
from fedlora_common.messages import RunSpec
from fedlora_server.aggregation import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    AttemptPlan,
)
from fedlora_server.config import RunSettings
from fedlora_server.errors import (
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from fedlora_server.journal import stop_request
from fedlora_server.ledger import RoundLedger
from fedlora_server.metrics import ServerMetrics
from fedlora_server.phases import (
    Admission,
    Backoff,
    Committing,
    Evaluation,
    Finished,
    Initialize,
    Phase,
    PhaseName,
    Training,
    round_of,
)
from fedlora_server.planning import RoundPlans
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.state_check import versions_without_run
from fedlora_server.store import (
    CoordinatorStore,
    RoundRecord,
    RunRecord,
)
from fedlora_server.versions import GlobalModel, Versions

__all__ = ["RunTransitions"]

log = structlog.get_logger()


class RunTransitions:
    """The run's state and every transition of it; `fedlora_server.machine.PhaseMachine` takes requests."""

    def __init__(
        self,
        *,
        settings: RunSettings,
        store: CoordinatorStore,
        metrics: ServerMetrics,
        versions: Versions,
        aggregator: Aggregator,
        plans: RoundPlans,
        privacy: ClientPrivacy | None,
        clock: Callable[[], float],
        spool_dir: Path,
    ) -> None:
        self._settings = settings
        self._ledger = RoundLedger(store=store, metrics=metrics, privacy=privacy, clock=clock)
        self._metrics = metrics
        self._versions = versions
        self._aggregator = aggregator
        self._plans = plans
        self.privacy = privacy
        self._clock = clock
        self._spool_dir = spool_dir
        self._run_spec = settings.run_spec()
        self._lock = threading.RLock()
        self._depth = threading.local()
        """Per thread, how deeply it holds the lock through `_transition`."""
        self._changed = threading.Condition(self._lock)
        """Notified whenever the run moves: held polls look again."""
        self._finished = threading.Event()
        self._joined: dict[str, int] = {}
        self._ranks: dict[str, int] = {}
        """The rank each joined site trains (hetlora: at most the run's)."""
        self._uploading: set[str] = set()
        self._excluded: dict[int, set[str]] = {}
        self._retried_at = 0.0
        self._stop: str | None = None
        """Why an operator asked the run to end after the round in progress; None unless asked."""
        self._phase: Phase = Admission(clock() + settings.timeouts.admission_s)
        self._resume()

    @property
    def settings(self) -> RunSettings:
        """The run's settings as they stand (amendments included)."""
        return self._settings

    @property
    def stopping(self) -> str | None:
        """Why an operator asked the run to end (it will, after the round in progress); None unless asked."""
        return self._stop

    @property
    def run_spec(self) -> RunSpec:
        return self._run_spec

    @property
    def phase(self) -> PhaseName:
        return self._phase.name

    @property
    def current_phase(self) -> Phase:
        return self._phase

    @property
    def finished(self) -> threading.Event:
        return self._finished

    @property
    def failure(self) -> str | None:
        """Why the run ended before its last round; None while it runs or once it finished."""
        phase = self._phase
        return phase.failure if isinstance(phase, Finished) else None

    def _stopped(self) -> None:
        current = self._versions.current
        self._finish(0 if current is None else current.round)
        log.info("run_stopped", reason=self._stop)

    def tick(self) -> None:
        """Close phases whose deadline passed; called periodically by the server."""
        with self._transition():
            self._advance()

    def _advance(self) -> None:
        """Move through every transition that is due now (caller holds the lock); held polls hear of any."""
        moved = False
        while True:
            before = self._state_key()
            self._step()
            if self._state_key() == before:
                break
            moved = True
        if moved:
            self._moved()

    def _moved(self) -> None:
        """Wake every held poll to look again (from any thread: the condition's lock is re-entrant)."""
        with self._changed:
            self._changed.notify_all()

    def _state_key(self) -> tuple[str, int, int, Hashable]:
        phase = self._phase
        if isinstance(phase, Training):
            return (phase.name, phase.record.round, phase.record.attempt, phase.aggregation.progress())
        return (phase.name, round_of(phase), 0, None)

    def _step(self) -> None:
        phase, now = self._phase, self._clock()
        if isinstance(phase, Admission):
            if len(self._joined) >= self._settings.min_workers:
                self._leave_admission()
            elif now >= phase.deadline_at:
                log.warning("admission_waiting", joined=len(self._joined), needed=self._settings.min_workers)
                phase.deadline_at = now + self._settings.timeouts.admission_s
        elif isinstance(phase, Initialize) and now >= phase.deadline_at:
            self._start_initialize(exclude={phase.initializer})
        elif isinstance(phase, Backoff) and now >= phase.resume_at:
            self._start_train(phase.round, phase.base)
        elif isinstance(phase, Training):
            try:
                result = phase.aggregation.step(now)
            except AggregationFailed as exc:
                self._fail_attempt(phase, str(exc), offenders=exc.offenders)
                return
            except Exception as exc:  # whatever broke, it breaks this attempt only
                log.exception("aggregation_failed_unexpectedly", round=phase.record.round)
                self._fail_attempt(
                    phase,
                    f"the coordinator failed to aggregate ({type(exc).__name__}); its log has the details "
                    "(aggregation_failed_unexpectedly)",
                    offenders=(),
                )
                return
            if result is not None:  # finished and written by `_settle`, once the lock is released
                self._phase = Committing(phase, result, writer=threading.get_ident())
        elif isinstance(phase, Evaluation) and (set(phase.participants) <= phase.done or now >= phase.deadline_at):
            self._close_evaluation(phase)

    def _leave_admission(self) -> None:
        current = self._versions.current
        if current is None:
            self._start_initialize(exclude=set())
            return
        last = self._ledger.last_attempt(current.round)
        if last is not None and last.status == "completed":
            self._start_next_round_or_finish(current)
        else:
            self._start_evaluate(current, record=last if current.round > 0 else None)

    def _start_initialize(self, *, exclude: set[str]) -> None:
        candidates = sorted(set(self._joined) - exclude) or sorted(self._joined)
        now = self._clock()
        self._phase = Initialize(candidates[0], now, now + self._deadline(training=True))
        log.info("initialize", initializer=candidates[0])

    def _start_train(self, round_: int, base: GlobalModel) -> None:
        train_s, stage_s = self._deadline(training=True), self._deadline(training=False)
        participants = self._participants(round_)
        if len(participants) < self._settings.min_workers:
            self._understaffed(round_, self._excluded.get(round_, set()))
            return
        last = self._ledger.last_attempt(round_)
        if last is not None and last.status == "training":  # its end was never recorded: the store failed
            reason = "abandoned: the coordinator could not record how it ended (its storage failed)"
            self._ledger.failed(last, dropped=(), excluded=(), reason=reason)
        record = self._ledger.attempt_started(round_, participants, train_s)
        blocks = self._versions.update_manifest(base)
        heterogeneous = self._settings.aggregation == "hetlora"
        plan = AttemptPlan(
            round=round_,
            attempt=record.attempt,
            participants=record.participants,
            base_version=base.number,
            numel=blocks.numel,
            started_at=record.started_at,
            train_deadline_s=train_s,
            stage_deadline_s=stage_s,
            min_updates=self._settings.min_workers,
            blocks=blocks,
            groups=block_groups(blocks, rank=self._settings.lora.rank, heterogeneous=heterogeneous),
            ranks={w: self._ranks.get(w, self._settings.lora.rank) for w in record.participants},
        )
        self._phase = Training(record, self._aggregator.open(plan), base)
        log.info("round_started", round=round_, attempt=record.attempt, participants=len(record.participants))

    def _participants(self, round_: int) -> tuple[str, ...]:
        """Who an attempt of `round_` would start with: the joined workers its earlier attempts did not exclude."""
        return tuple(sorted(set(self._joined) - self._excluded.get(round_, set())))

    def _understaffed(self, round_: int, excluded: set[str]) -> None:
        """Too few workers for an attempt: wait in admission for those who may still join, else fail the run."""
        departed = set(self._ledger.departures()) - set(self._joined)
        eligible = {w.id for w in self._settings.workers} - excluded - departed
        needed = self._settings.min_workers
        if len(eligible) >= needed:
            self._phase = Admission(self._clock() + self._settings.timeouts.admission_s)
            log.info("round_waiting_for_workers", round=round_, excluded=sorted(excluded), needed=needed)
            return
        self._give_up(
            round_,
            f"round {round_} cannot go on: {len(eligible)} workers can take part once {', '.join(sorted(excluded))} "
            f"sit out for faults its attempts showed, and the run needs {needed}",
        )

    @contextmanager
    def _transition(self) -> Iterator[None]:
        """The lock, for one request's part in the run; once released, the commit its transitions left due.

        A commit writes and fsyncs the next version (about a second at 42M parameters): under the lock every
        poll, health check and upload would wait behind it. Nested uses settle at the outermost only. Whatever
        moved the run meanwhile (a transition of `_advance`, or one a request made itself, like the initial
        upload's), held polls hear of it.
        """
        depth = getattr(self._depth, "count", 0)
        with self._lock:
            self._depth.count = depth + 1
            before = self._state_key()
            try:
                yield
            finally:
                self._depth.count = depth
                if self._state_key() != before:
                    self._moved()
        if depth == 0:
            self._settle()

    def _commit_due(self) -> bool:
        """A version waits for this thread to write it (caller holds the lock)."""
        phase = self._phase
        return isinstance(phase, Committing) and phase.writer == threading.get_ident() and not phase.writing

    def _settle(self) -> None:
        """Write the version this thread's request left due, outside the lock, then move on."""
        with self._lock:
            phase = self._phase
            if not self._commit_due():
                return
            assert isinstance(phase, Committing)
            phase.writing = True
        training = phase.training
        result: Aggregate | None = None
        model: GlobalModel | None = None
        fault: Exception | None = None
        try:
            result = phase.closing.finish()
            started = time.perf_counter()
            model = self._versions.commit_update(
                training.base, result.mean, training.record.round, contributors=len(result.contributors)
            )
            self._metrics.aggregation_seconds.labels(step="commit").observe(time.perf_counter() - started)
        except Exception as exc:  # booked under the lock below, whatever it was
            fault = exc
        with self._lock:
            self._written(phase, result, model, fault)
            self._advance()
            self._moved()  # the commit phase is over, whatever follows it

    def _written(
        self, phase: Committing, result: Aggregate | None, model: GlobalModel | None, fault: Exception | None
    ) -> None:
        """Book the written version (or why there is none) and open the evaluation; the run may have ended
        meanwhile."""
        training = phase.training
        record = training.record
        if self._phase is not phase:  # the run failed or was stopped meanwhile: what was written stands
            log.warning("commit_outlived_its_round", round=record.round, written=model is not None)
            return
        self._phase = training
        if isinstance(fault, AggregationFailed):
            self._fail_attempt(training, str(fault), offenders=fault.offenders)
            return
        if isinstance(fault, (OSError, Unavailable)):
            self._storage_fault(f"the coordinator could not commit round {record.round}: {fault}")
            return
        if fault is not None or model is None or result is None:
            log.error("commit_failed_unexpectedly", round=record.round, error=repr(fault))
            self._fail_attempt(
                training,
                f"the coordinator failed to commit ({type(fault).__name__}); its log has the details "
                "(commit_failed_unexpectedly)",
                offenders=(),
            )
            return
        self._commit(training, result, model, stop_now=phase.stop_now)

    def _commit(self, phase: Training, result: Aggregate, model: GlobalModel, *, stop_now: bool) -> None:
        record = phase.record
        try:
            committed = self._ledger.committed(
                record, dropped=phase.aggregation.missing, secagg=result.secagg, excluded=result.excluded
            )
        except Unavailable as exc:  # the version stands; its round's figures are booked again on resume
            log.error("storage_fault", reason=str(exc), round=record.round)
            committed = replace(record, status="evaluating")
        phase.aggregation.discard()
        log.info(
            "round_committed", round=record.round, updates=len(result.contributors), train_loss=committed.train_loss
        )
        if stop_now:
            self._stopped()
            return
        self._start_evaluate(model, record=committed)

    def _fail_attempt(self, phase: Training, reason: str, *, offenders: tuple[str, ...]) -> None:
        """Nothing of the attempt is kept; the round is retried without the workers shown at fault, after a
        wait that grows with each failure of the round, until it has used its attempts and the run fails."""
        record = phase.record
        self._ledger.failed(record, dropped=phase.aggregation.missing, excluded=offenders, reason=reason)
        self._excluded.setdefault(record.round, set()).update(offenders)
        phase.aggregation.discard()
        log.warning("round_failed", round=record.round, attempt=record.attempt, reason=reason, excluded=offenders)
        timeouts = self._settings.timeouts
        used = self._ledger.attempts_since(record.round, self._retried_at)
        if used >= timeouts.attempts_per_round:
            self._give_up(record.round, f"round {record.round} failed all {used} attempts; the last: {reason}")
            return
        delay = timeouts.retry_delay(used)
        if delay <= 0 or len(self._participants(record.round)) < self._settings.min_workers:
            self._start_train(record.round, phase.base)  # at once, or straight to waiting for workers (or failing)
            return
        self._phase = Backoff(record.round, phase.base, self._clock() + delay, reason)
        self._metrics.round_backoff.set(1)
        log.info("round_backoff", round=record.round, next_attempt=record.attempt + 1, wait_s=delay)

    @contextmanager
    def _blame(self, worker_id: str) -> Iterator[None]:
        """An unexpected error while taking `worker_id`'s input ends the attempt (without it), not the run.

        A fault of the coordinator's own disk or database ends the attempt too, blaming nobody, and
        the worker hears UNAVAILABLE (it retries)."""
        try:
            yield
        except Unavailable as exc:
            self._storage_fault(str(exc))
            raise
        except CoordinatorError:
            raise
        except OSError as exc:
            reason = f"the coordinator's disk failed: {exc}"
            self._storage_fault(reason)
            raise Unavailable(reason) from None
        except Exception as exc:
            phase = self._phase
            log.exception("input_broke_attempt", worker_id=worker_id)
            if isinstance(phase, Training):
                self._fail_attempt(
                    phase,
                    f"{worker_id}'s input broke the attempt ({type(exc).__name__}); the coordinator's log has the "
                    "details (input_broke_attempt)",
                    offenders=(worker_id,),
                )
            raise InvalidArgument(f"refused: it could not be taken into the round ({type(exc).__name__})") from None

    def _storage_fault(self, reason: str, *, attempt: tuple[str, int, int, Hashable] | None = None) -> None:
        """The coordinator's own storage failed: the open attempt (if it is still `attempt`) fails for that
        reason, nobody excluded. If even that cannot be recorded, resume from the store as a restart would."""
        phase = self._phase
        log.error("storage_fault", reason=reason)
        if not isinstance(phase, Training) or (attempt is not None and self._state_key()[:3] != attempt[:3]):
            return
        try:
            self._fail_attempt(phase, reason, offenders=())
        except Unavailable as exc:
            log.error("resuming_from_store", round=phase.record.round, reason=str(exc))
            with suppress(Unavailable):  # what the attempt held is dropped either way
                phase.aggregation.discard()
            self._phase = Admission(self._clock() + self._settings.timeouts.admission_s)

    def _start_evaluate(self, model: GlobalModel, *, record: RoundRecord | None) -> None:
        now = self._clock()
        participants = tuple(sorted(self._joined))
        self._phase = Evaluation(model.round, record, participants, now, now + self._deadline(training=True), model)
        log.info("evaluation_started", round=model.round, version=model.number, participants=len(participants))

    def _close_evaluation(self, phase: Evaluation) -> None:
        eval_loss = self._ledger.evaluated(
            phase.round,
            phase.record,
            participants=phase.participants,
            started_at=phase.started_at,
            deadline_at=phase.deadline_at,
        )
        log.info("round_evaluated", round=phase.round, eval_loss=eval_loss, reports=len(phase.done))
        self._start_next_round_or_finish(phase.model)

    def _fail_run(self, phase: Phase, failure: str) -> None:
        if isinstance(phase, Committing):  # the version being written stands; its attempt is booked as failed
            phase = phase.training
        if isinstance(phase, Training):
            self._ledger.failed(phase.record, dropped=phase.aggregation.missing, excluded=(), reason=failure)
            phase.aggregation.discard()
        self._give_up(round_of(phase), failure)

    def _give_up(self, round_: int, failure: str) -> None:
        """The run ends without finishing its rounds; its last committed round stands."""
        self._ledger.run_failed(failure)
        self._finish(round_, failure)
        log.error("run_failed", reason=failure)

    def _finish(self, round_: int, failure: str | None = None) -> None:
        """The run is over, finished, stopped or failed: say so to whoever waits on it, and to Prometheus."""
        if failure is not None:
            reason = f"the run failed: {failure}"
        elif self._stop is not None:
            reason = f"an operator stopped the run at round {round_}: {self._stop}"
        else:
            reason = f"the run committed all its {round_} rounds"
        self._phase = Finished(round_, failure, reason)
        self._moved()
        self._metrics.round_backoff.set(0)
        self._metrics.run_finished.set(failure is None)
        self._metrics.run_failed.set(failure is not None)
        self._finished.set()

    def _start_next_round_or_finish(self, model: GlobalModel) -> None:
        if self._stop is not None:
            self._stopped()
            return
        completed_round = model.round
        budget_spent = self.privacy is not None and not self.privacy.allows(completed_round + 1)
        if completed_round < self._settings.rounds and not budget_spent:
            self._start_train(completed_round + 1, model)
            return
        self._finish(completed_round)
        if budget_spent and completed_round < self._settings.rounds:
            log.warning("privacy_budget_reached", rounds=completed_round, planned=self._settings.rounds)
        log.info("run_finished", rounds=completed_round)

    def _deadline(self, *, training: bool) -> float:
        current = self._versions.current
        payload = current.version.size_bytes if current else 0
        return self._settings.timeouts.phase_deadline(2 * payload, training=training).total_seconds()

    def _require_joined(self, worker_id: str) -> None:
        if worker_id not in self._joined:
            raise FailedPrecondition(f"{worker_id} has not joined the run; call Join first")

    def _take_journal(self, latest: GlobalModel | None) -> None:
        """What operators asked of the run before this start: a retry (its attempts count afresh), a stop (the run
        is over at its last committed round); and whether it had already committed all its rounds."""
        events = self._ledger.events()
        self._retried_at = max((e.at for e in events if e.kind == "retried"), default=0.0)
        stop = stop_request(events)
        if stop is not None:
            self._stop = stop.reason or "the operator stopped the run"
            self._stopped()
        elif latest is not None and latest.round >= self._settings.rounds:
            last = self._ledger.last_attempt(latest.round)
            if last is not None and last.status == "completed":
                self._finish(latest.round)
                log.info("run_finished_before_restart", rounds=latest.round)

    def _resume(self) -> None:
        """Pick up a run this store already holds, at its last committed version; StateError if it cannot.

        Exclusions are rebuilt from the attempts that showed them (a worker caught cheating stays out
        of its round however often the coordinator restarts), and a version committed just before a
        crash whose round was not booked as committed yet is booked now.
        """
        if self._ledger.stored_run() is None and (stray := self._versions.stray_artifacts()):
            raise versions_without_run(stray)
        existing = self._ledger.open_run(
            RunRecord(self._settings.run_id, self._settings.model_dump_json(), self._clock())
        )
        if existing is not None:
            latest = self._versions.restore()
            self._excluded = self._ledger.exclusions()
            booked = None if latest is None or latest.round < 1 else self._ledger.last_attempt(latest.round)
            if booked is not None and booked.status == "failed":  # open_run closed it: the crash came first
                self._ledger.committed(booked, dropped=(), secagg=None)
                log.info("round_booked_as_committed", round=booked.round, attempt=booked.attempt)
            log.info("run_resumed", run_id=existing.run_id, version=None if latest is None else latest.number)
            self._take_journal(latest)
            if existing.failure:  # a failed run stays failed: its report and its last committed round stand
                self._finish(0 if latest is None else latest.round, existing.failure)
                log.error("run_failed_before_restart", reason=existing.failure)
