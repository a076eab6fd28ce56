"""Secure aggregation (Bonawitz et al., CCS 2017) as an aggregator: the driver of `SecureRound`.

Each round attempt walks advertise -> share -> masked -> unmask, each stage closing when all its
members answered or its deadline passed. Masked uploads are folded into the modular sum as
their chunks arrive; a stream that turns out bad, or is still open when the stage closes, is
subtracted back out exactly (from a journal of what it added, read back only then: one file
per worker in the spool directory, the size of one update, reused round after round).
With client-level DP the round's parameters carry the distributed Skellam noise plan.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from fedlora_common.blocks import group_mean
from fedlora_common.messages import SecAggTask, TaskKind, UploadHeader, UploadKind
from fedlora_common.privacy import plan_distributed_noise
from fedlora_common.secagg import Advertisement, Complaint, SecAggParams, dequantize_sum, max_bits, round_tag
from fedlora_server.aggregation.base import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    Ask,
    AttemptPlan,
    Closing,
    KeyShares,
    Reveal,
    RoundAggregation,
    SecureMessage,
)
from fedlora_server.config import SecureAggregationSection
from fedlora_server.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from fedlora_server.intake import READ_SLICE_BYTES, Received, UploadSink
from fedlora_server.metrics import ServerMetrics
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.secure_round import RoundFailed, SecureRound

__all__ = ["SecureAggregator"]

ITEM = np.dtype(np.uint32).itemsize
log = structlog.get_logger()


class SecureAggregator(Aggregator):
    def __init__(
        self,
        *,
        run_id: str,
        settings: SecureAggregationSection,
        max_examples: int,
        identities: Mapping[str, bytes],
        privacy: ClientPrivacy | None,
        metrics: ServerMetrics,
        journal_dir: Path,
    ) -> None:
        self._run_id = run_id
        self._settings = settings
        self._max_examples = max_examples
        self._identities = dict(identities)
        self._privacy = privacy
        self._metrics = metrics
        self._journal_dir = journal_dir

    def params(self, plan: AttemptPlan) -> SecAggParams:
        """The attempt's public parameters: threshold, quantization, and the distributed noise if any."""
        s, n = self._settings, len(plan.participants)
        threshold = SecAggParams.threshold_for(n, s.threshold_fraction)
        bits, clip_range, max_examples, noise_variance = s.bits or max_bits(n), s.clip_range, self._max_examples, 0.0
        if self._privacy is not None:  # distributed DP: unweighted mean of updates clipped to C, plus Skellam noise
            noise = plan_distributed_noise(
                participants=n,
                threshold=threshold,
                noise_multiplier=self._privacy.noise_multiplier,
                clip_norm=self._privacy.clip_norm,
                dimension=plan.numel,
            )
            bits, clip_range, max_examples, noise_variance = noise.bits, noise.clip, 1, noise.worker_variance
        return SecAggParams(
            run_id=self._run_id,
            tag=round_tag(plan.round, plan.attempt),
            participants=plan.participants,
            threshold=threshold,
            bits=bits,
            clip_range=clip_range,
            max_examples=max_examples,
            noise_variance=noise_variance,
        )

    def allow(self, identities: Mapping[str, bytes]) -> None:
        self._identities = dict(identities)

    def open(self, plan: AttemptPlan) -> SecureRoundAggregation:
        secure = SecureRound(params=self.params(plan), identities=self._identities, numel=plan.numel + plan.group_count)
        return SecureRoundAggregation(plan, secure, metrics=self._metrics, journal_dir=self._journal_dir)


class _MaskedStream:
    """One masked upload folded into the sum as it arrives, with a journal to take it back out.

    The journal is a file per worker that is overwritten in place, upload after upload: writing it
    costs a copy into pages the kernel already holds, and it is read only to undo a bad stream.
    It is the coordinator's own disk: a fault there is Unavailable, never the uploader's fault.
    """

    def __init__(self, secure: SecureRound, worker: str, journal: Path) -> None:
        self._path = journal
        with self._faults("open"):
            journal.parent.mkdir(parents=True, exist_ok=True)
            self._journal = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
        self._secure = secure
        self._worker = worker
        self._lock = threading.Lock()
        self._added = 0
        self._closed = False

    @contextmanager
    def _faults(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise Unavailable(
                f"the coordinator could not {doing} its masked-upload journal {self._path}: {exc}"
            ) from None

    def write(self, offset: int, values: npt.NDArray[Any]) -> None:
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the masked-upload stage closed while this upload was streaming")
            with self._faults("write"):  # first: only what is journalled can be undone
                written = os.pwrite(self._journal, values.data, offset * ITEM)
            if written != values.nbytes:
                raise Unavailable(f"the coordinator could not write its masked-upload journal {self._path}: disk full")
            self._secure.add_masked(self._worker, values, offset)
            self._added = offset + values.size

    def abort(self) -> None:
        """Subtract everything this stream added; safe to call twice and from any thread."""
        with self._lock:
            if not self._closed:
                try:
                    self._take_back()
                finally:
                    self._close()

    def _take_back(self) -> None:
        for start in range(0, self._added, READ_SLICE_BYTES // ITEM):
            size = min(READ_SLICE_BYTES // ITEM, self._added - start)
            with self._faults("read back"):
                block = os.pread(self._journal, size * ITEM, start * ITEM)
            if len(block) != size * ITEM:
                raise Unavailable(f"the coordinator's masked-upload journal {self._path} lost what it held")
            self._secure.subtract_masked(np.frombuffer(block, dtype=np.uint32), start)

    def finish(self) -> None:
        """The stream is in the sum for good: nothing more may be added."""
        with self._lock:
            if not self._closed:
                self._close()

    def _close(self) -> None:
        self._closed = True
        with suppress(OSError):
            os.close(self._journal)


class SecureRoundAggregation(RoundAggregation):
    def __init__(self, plan: AttemptPlan, secure: SecureRound, *, metrics: ServerMetrics, journal_dir: Path) -> None:
        super().__init__(plan)
        self._secure = secure
        self._metrics = metrics
        self._journal_dir = journal_dir
        self._streams: dict[str, _MaskedStream] = {}
        self._stats: dict[str, dict[str, float]] = {}
        self._stage_started = plan.started_at
        self._deadline_at = plan.started_at + plan.train_deadline_s

    @property
    def params(self) -> SecAggParams:
        return self._secure.params

    @property
    def deadline_at(self) -> float:
        return self._deadline_at

    def progress(self) -> Hashable:
        return self._secure.stage

    @property
    def missing(self) -> tuple[str, ...]:
        survivors = self._secure.u3 if self._secure.stage in ("unmask", "done") else ()
        return tuple(sorted(set(self.plan.participants) - set(survivors)))

    def ask(self, worker: str) -> Ask | None:
        secure, params = self._secure, self._secure.params
        if secure.stage == "advertise" and not secure.has_advertised(worker):
            return Ask(TaskKind.TRAIN, SecAggTask(params))
        if secure.stage == "share" and worker in secure.u1 and not secure.has_shared(worker):
            return Ask(TaskKind.SECAGG_SHARE_KEYS, SecAggTask(params, roster=tuple(secure.roster())))
        if secure.stage == "masked" and worker in secure.u2 and not secure.has_masked(worker):
            inbox = tuple(secure.inbox(worker))
            return Ask(TaskKind.SECAGG_MASKED_UPLOAD, SecAggTask(params, inbox=inbox, survivors=secure.u2))
        if secure.stage == "unmask" and worker in secure.u3 and not secure.has_revealed(worker):
            return Ask(TaskKind.SECAGG_UNMASK, SecAggTask(params, survivors=secure.u3, dropped=secure.dropped))
        return None

    def _check_tag(self, tag: int) -> None:
        if tag != self._secure.params.tag:
            raise FailedPrecondition(
                f"message for session tag {tag}; the open round attempt is {self._secure.params.tag} "
                "(replayed from another round or attempt?)"
            )

    def receive(self, worker: str, tag: int, message: SecureMessage) -> int:
        self._check_tag(tag)
        match message:
            case Advertisement(worker_id=claimed, mask_public=mask, enc_public=enc, signature=signature):
                if claimed != worker:
                    raise PermissionDenied(f"{worker} cannot advertise keys for {claimed}")
                self._secure.advertise(message)
                return self._count("advertise", len(mask) + len(enc) + len(signature))
            case KeyShares(shares=shares):
                self._secure.submit_shares(worker, shares)
                return self._count("share", sum(len(s.ciphertext) for s in shares))
            case Reveal(shares=reveals):
                self._secure.submit_reveal(worker, reveals)
                return self._count("unmask", sum(len(r.share) for r in reveals))
            case Complaint(enc_private=key):
                self._secure.complain(worker, message)
                for offender, why in sorted(self._secure.faults.items()):
                    log.warning("share_fault_proven", worker_id=offender, reason=why, round=self.plan.round)
                return self._count("masked", len(key))

    def open_upload(self, header: UploadHeader) -> UploadSink:
        if header.kind is not UploadKind.MASKED:
            raise FailedPrecondition("this run aggregates securely: send a masked update")
        self._check_tag(header.tag)
        if header.round != self.plan.round:
            raise FailedPrecondition(f"round {header.round} is not accepting updates")
        numel = header.total_size // 4
        self._secure.check_masked_upload(header.worker_id, numel)
        if header.total_size != numel * 4:
            raise InvalidArgument(f"total_size {header.total_size} is not a whole number of uint32 values")
        stream = _MaskedStream(self._secure, header.worker_id, self._journal_dir / f"{header.worker_id}.masked-journal")
        self._streams[header.worker_id] = stream
        return stream

    def accept(self, header: UploadHeader, sink: UploadSink, received: Received) -> int:
        stream = self._streams.pop(header.worker_id, None)
        if stream is not sink:
            sink.abort()
            raise FailedPrecondition("the masked-upload stage closed while the upload was streaming")
        self._secure.close_masked_upload(header.worker_id)
        stream.finish()
        self._count("masked", received.size_bytes)
        return 1  # the coordinator never learns a worker's weight here; train losses average unweighted

    def drop(self, worker: str) -> None:
        self._secure.drop(worker)

    def step(self, now: float) -> Closing | None:
        secure = self._secure
        if secure.faults:
            reason = "; ".join(f"{w} {why}" for w, why in sorted(secure.faults.items()))
            raise AggregationFailed(f"a complaint proved a fault: {reason}", offenders=tuple(sorted(secure.faults)))
        if secure.stage in ("done", "failed") or not (secure.ready() or now >= self._deadline_at):
            return None
        stage = secure.stage
        members = {"advertise": secure.params.participants, "share": secure.u1, "masked": secure.u2}.get(
            stage, secure.u3
        )
        try:
            if stage == "advertise":
                secure.close_advertise()
            elif stage == "share":
                secure.close_share()
            elif stage == "masked":
                self._revoke_open_streams()
                secure.close_masked()
            else:  # unmasking (self masks over the whole vector) runs once the coordinator's lock is free
                return Closing(lambda: self._finish(now, members))
        except RoundFailed as exc:
            self._record_stage(stage, now, dropouts=len(members))
            raise AggregationFailed(str(exc)) from None
        after = {"share": secure.u1, "masked": secure.u2, "unmask": secure.u3}[secure.stage]
        self._record_stage(stage, now, dropouts=len(members) - len(after))
        log.info(
            "secagg_stage", round=self.plan.round, attempt=self.plan.attempt, stage=secure.stage, members=len(after)
        )
        self._deadline_at = now + self.plan.stage_deadline_s
        self._stage_started = now
        return None

    def _finish(self, now: float, members: tuple[str, ...]) -> Aggregate:
        started = time.perf_counter()
        try:
            total = self._secure.finish()
            mean = self._dequantized_mean(total)
        except RoundFailed as exc:
            self._record_stage("unmask", now, dropouts=len(members))
            raise AggregationFailed(str(exc), offenders=exc.offenders) from None
        except ValueError as exc:
            self._record_stage("unmask", now, dropouts=len(members))
            raise AggregationFailed(f"unmasking failed: {exc}") from None
        self._metrics.aggregation_seconds.labels(step="unmask").observe(time.perf_counter() - started)
        revealed = tuple(w for w in members if self._secure.has_revealed(w))
        self._record_stage("unmask", now, dropouts=len(members) - len(revealed))
        for liar, why in sorted(self._secure.liars.items()):
            log.warning("share_liar_excluded", worker_id=liar, reason=why, round=self.plan.round)
        return Aggregate(mean, self._secure.u3, secagg=self._stats, excluded=tuple(sorted(self._secure.liars)))

    def _dequantized_mean(self, total: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
        """sum_u (w_u/M) delta_u / sum_u (w_u/M): the example-weighted mean, from sums alone; under heterogeneous
        rank, each rank index's sum over the weights of the sites that trained it (summed in the masked vector)."""
        params, plan = self._secure.params, self.plan
        groups = plan.group_count
        weights = total[-groups:].astype(np.float64)
        if weights[0] <= 0:
            raise ValueError("the securely aggregated weight is zero")
        values = dequantize_sum(total[:-groups], clip=params.clip_range, bits=params.bits)
        if groups == 1 or plan.blocks is None or plan.groups is None:
            return (values * (params.max_examples / float(weights[0]))).astype(np.float32)
        return group_mean(values * params.max_examples, plan.blocks, plan.groups, weights)

    def _revoke_open_streams(self) -> None:
        for stream in self._streams.values():
            stream.abort()
        self._streams.clear()

    def _record_stage(self, stage: str, now: float, *, dropouts: int) -> None:
        stats = self._stats.setdefault(stage, {"dropouts": 0, "seconds": 0.0, "bytes": 0})
        stats["dropouts"] += dropouts
        stats["seconds"] = round(now - self._stage_started, 3)
        self._metrics.secagg_dropouts.labels(stage=stage).inc(dropouts)
        self._metrics.secagg_stage_seconds.labels(stage=stage).observe(now - self._stage_started)

    def _count(self, stage: str, nbytes: int) -> int:
        stats = self._stats.setdefault(stage, {"dropouts": 0, "seconds": 0.0, "bytes": 0})
        stats["bytes"] += nbytes
        self._metrics.secagg_bytes.labels(stage=stage).inc(nbytes)
        return nbytes

    def discard(self) -> None:
        self._revoke_open_streams()
