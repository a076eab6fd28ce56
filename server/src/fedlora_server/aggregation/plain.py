"""Aggregation in the clear: a weighted mean of float updates, folded into one accumulator.

Each stream is spooled and folded only once its digest checks out (folding floats cannot be
undone exactly), so a bad stream leaves the sum as it was. Memory stays O(model): one float64
accumulator, whatever the number of workers.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedlora_common.aggregation import StreamingAccumulator
from fedlora_common.blocks import group_mean, site_weights
from fedlora_common.messages import TaskKind, UploadHeader, UploadKind
from fedlora_server.aggregation.base import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    Ask,
    AttemptPlan,
    Closing,
    RoundAggregation,
)
from fedlora_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from fedlora_server.intake import Received, Spool, UploadSink
from fedlora_server.metrics import ServerMetrics

__all__ = ["PlainAggregator", "PlainRoundAggregation", "Weighting"]

Weighting = Literal["examples", "uniform"]
"""examples: FedAvg by example count; uniform: every update counts once (DP-FedAvg, whose clip bounds each)."""


class PlainAggregator(Aggregator):
    """weighting "examples" caps each worker's self-reported count at max_examples."""

    def __init__(self, *, weighting: Weighting, max_examples: int, spool_dir: Path, metrics: ServerMetrics) -> None:
        self._weighting = weighting
        self._max_examples = max_examples
        self._spool_dir = spool_dir
        self._metrics = metrics

    def open(self, plan: AttemptPlan) -> PlainRoundAggregation:
        return PlainRoundAggregation(
            plan,
            weighting=self._weighting,
            max_examples=self._max_examples,
            spool_dir=self._spool_dir,
            metrics=self._metrics,
        )


class PlainRoundAggregation(RoundAggregation):
    def __init__(
        self,
        plan: AttemptPlan,
        *,
        weighting: Weighting,
        max_examples: int,
        spool_dir: Path,
        metrics: ServerMetrics,
    ) -> None:
        super().__init__(plan)
        self.accumulator = StreamingAccumulator(plan.numel)
        self._group_weights = np.zeros(plan.group_count, dtype=np.float64)
        self._weighting = weighting
        self._max_examples = max_examples
        self._spool_dir = spool_dir
        self._metrics = metrics
        self._done: set[str] = set()
        """Updates folded and accepted (booked under the coordinator's lock)."""
        self._folded: set[str] = set()
        """Updates in the sum; one not yet in `_done` is between its fold and its acceptance."""
        self._gone: set[str] = set()
        self._spools: dict[str, Spool] = {}
        self._folding = threading.Lock()
        """Held while an upload folds (outside the coordinator's lock) and while the mean is taken from the sum."""
        self._closed = False
        """The mean was taken: no fold may change the sum any more."""

    @property
    def deadline_at(self) -> float:
        return self.plan.started_at + self.plan.train_deadline_s

    def progress(self) -> Hashable:
        return len(self._done)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.plan.participants) - self._done))

    def ask(self, worker: str) -> Ask | None:
        return None if worker in self._done else Ask(TaskKind.TRAIN)

    def open_upload(self, header: UploadHeader) -> UploadSink:
        plan = self.plan
        if header.kind is UploadKind.MASKED:
            raise FailedPrecondition("no secure aggregation is open: this run aggregates in the clear")
        if header.kind is not UploadKind.DELTA or header.round != plan.round:
            raise FailedPrecondition(f"round {header.round} is not accepting updates (phase train)")
        if header.worker_id not in plan.participants:
            raise PermissionDenied(f"{header.worker_id} is not a participant of round {plan.round}")
        if header.worker_id in self._done:
            raise AlreadyExists(f"{header.worker_id} already uploaded round {plan.round}")
        if header.base_version != plan.base_version:
            raise FailedPrecondition(
                f"update computed on version {header.base_version}; the round trains version {plan.base_version}"
            )
        if header.total_size != plan.numel * 4:
            raise InvalidArgument(f"total_size {header.total_size} != {plan.numel * 4} bytes the manifest needs")
        spool = Spool(self._spool_dir / f"r{plan.round:04d}-{header.worker_id}-{secrets.token_hex(4)}.part")
        self._spools[header.worker_id] = spool
        return spool

    def fold(self, header: UploadHeader, sink: UploadSink, received: Received) -> None:
        """Fold the verified stream, whole, into the sum and its weights, with the coordinator's lock free."""
        started = time.perf_counter()
        examples = min(header.num_examples, self._max_examples)
        weight = 1.0 if self._weighting == "uniform" else float(examples)
        with self._folding:
            spool = self._spools.pop(header.worker_id)
            try:
                if self._closed:
                    raise FailedPrecondition("the round closed while the upload was streaming")
                for offset, values in spool.slices(np.float32):
                    self.accumulator.add_slice(offset, values, weight)
                self.accumulator.close_update(weight)
                if plan_groups := self.plan.groups:
                    rank = self.plan.ranks.get(header.worker_id, plan_groups.rank)
                    self._group_weights += site_weights(plan_groups, site_rank=rank or 1, weight=weight)
            finally:
                spool.discard()
            self._folded.add(header.worker_id)
        self._metrics.aggregation_seconds.labels(step="fold").observe(time.perf_counter() - started)

    def accept(self, header: UploadHeader, sink: UploadSink, received: Received) -> int:
        self._done.add(header.worker_id)
        return min(header.num_examples, self._max_examples)

    def drop(self, worker: str) -> None:
        self._gone.add(worker)

    def step(self, now: float) -> Closing | None:
        """The mean once every participant still in the run uploaded, or at the deadline; never below min_updates.
        While an upload folds, or waits to be accepted after its fold, nothing closes: its acceptance steps the
        attempt again (an update in the sum is always one the round books, and whose sender hears it counted)."""
        if not self._folding.acquire(blocking=False):
            return None
        try:
            if self._folded - self._done:
                return None
            done, enough = self._done, len(self._done) >= self.plan.min_updates
            waited_for = set(self.plan.participants) - self._gone
            if enough and (waited_for <= done or now >= self.deadline_at):
                self._closed = True  # the sum stands from here: the mean is taken from it without any lock
                contributors = tuple(sorted(done))
                return Closing(lambda: Aggregate(self._mean(), contributors))
            if now >= self.deadline_at:
                self._closed = True
                raise AggregationFailed(f"{len(done)} of {len(self.plan.participants)} updates by the deadline")
            return None
        finally:
            self._folding.release()

    def _mean(self) -> npt.NDArray[np.float32]:
        """FedAvg's weighted mean; under heterogeneous rank each rank index over the sites that trained it."""
        plan = self.plan
        if plan.group_count == 1 or plan.blocks is None or plan.groups is None:
            return self.accumulator.mean()
        return group_mean(self.accumulator.sums, plan.blocks, plan.groups, self._group_weights)

    def discard(self) -> None:
        self._closed = True  # a fold still running refuses its upload
        for spool in list(self._spools.values()):
            spool.discard()
        self._spools.clear()
