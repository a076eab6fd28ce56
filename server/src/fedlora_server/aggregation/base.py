"""How a round attempt's updates combine, behind one interface the phase machine drives.

The phase machine opens one `RoundAggregation` per round attempt from its `AttemptPlan`, asks it
what each participant should do now, hands it every upload stream and secure-aggregation
message, and steps it until it yields the mean update or fails. It never learns how updates
combine: plainly or securely, as one block group or one per rank index (`fedlora_common.blocks`).
What the mean then becomes (FedAvg, a server optimizer, central noise) is the run's
`fedlora_server.strategy.Strategy`, which sees only the mean.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedlora_common.blocks import BlockGroups
from fedlora_common.manifest import Manifest
from fedlora_common.messages import SecAggTask, TaskKind, UploadHeader
from fedlora_common.secagg import Advertisement, Complaint, EncryptedShare, RevealedShare
from fedlora_server.errors import FailedPrecondition
from fedlora_server.intake import Received, UploadSink

__all__ = [
    "Aggregate",
    "AggregationFailed",
    "Aggregator",
    "Ask",
    "AttemptPlan",
    "Closing",
    "KeyShares",
    "Reveal",
    "RoundAggregation",
    "SecureMessage",
]


@dataclass(frozen=True)
class AttemptPlan:
    """One round attempt: who takes part, over which update, with which deadlines."""

    round: int
    attempt: int
    participants: tuple[str, ...]
    base_version: int
    numel: int
    """Elements of the update each participant sends."""
    started_at: float
    train_deadline_s: float
    """Training plus the first upload or stage."""
    stage_deadline_s: float
    """Each later stage (secure aggregation)."""
    min_updates: int
    blocks: Manifest | None = None
    """The update's named blocks (its manifest), which `groups` folds; None: one group over `numel` elements."""
    groups: BlockGroups | None = None
    """Which weight divides each block's sum: one for all, or one per rank index (hetlora)."""
    ranks: Mapping[str, int] = field(default_factory=dict)
    """The rank each participant trains (hetlora), as it said at join."""

    @property
    def group_count(self) -> int:
        return 1 if self.groups is None else self.groups.count


@dataclass(frozen=True)
class Ask:
    """What the aggregation needs from one participant now."""

    kind: TaskKind
    secagg: SecAggTask | None = None


@dataclass(frozen=True)
class Aggregate:
    """The attempt's result: the mean update, who is in it, and how it went (for the report)."""

    mean: npt.NDArray[np.float32]
    contributors: tuple[str, ...]
    secagg: dict[str, Any] | None = None
    """Per secure-aggregation stage: dropouts, seconds and bytes (report.json's `secagg`); None otherwise."""
    excluded: tuple[str, ...] = ()
    """Participants shown to have lied (a revealed share off its polynomial) in an attempt that still
    completed from the honest shares: recorded with the round."""


@dataclass(frozen=True)
class Closing:
    """An attempt that has all it waits for. `finish` computes its result (a mean over a 42M-element sum,
    unmasking) and is called once, without the coordinator's lock; it raises AggregationFailed if the result
    cannot be had (shares that do not reconstruct)."""

    finish: Callable[[], Aggregate]


class AggregationFailed(Exception):
    """The attempt cannot produce a mean; nothing of it is kept and the round is retried.

    `offenders`: the participants shown to have caused it; the retry goes on without them.
    """

    def __init__(self, reason: str, *, offenders: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.offenders = offenders


@dataclass(frozen=True)
class KeyShares:
    shares: tuple[EncryptedShare, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Reveal:
    shares: tuple[RevealedShare, ...] = field(default_factory=tuple)


SecureMessage = Advertisement | KeyShares | Reveal | Complaint
"""A message of the secure-aggregation stages, relayed or consumed by the coordinator."""


class RoundAggregation(abc.ABC):
    """One round attempt's aggregation. Called with the coordinator's lock held, except `open_upload`'s
    sink, which receives chunks outside it and must guard what it shares."""

    def __init__(self, plan: AttemptPlan) -> None:
        self.plan = plan

    @property
    @abc.abstractmethod
    def deadline_at(self) -> float:
        """When the current step closes whoever has not answered."""

    @abc.abstractmethod
    def ask(self, worker: str) -> Ask | None:
        """What `worker` should do now, or None when it has nothing to do (it waits)."""

    @abc.abstractmethod
    def open_upload(self, header: UploadHeader) -> UploadSink:
        """Check an upload's header against this attempt and return where its chunks go."""

    def fold(self, header: UploadHeader, sink: UploadSink, received: Received) -> None:
        """Fold a verified upload into the aggregate, without the coordinator's lock (it may take a while): guard
        what `step` reads. Raising refuses the upload. The default folds nothing (what streams in is folded)."""

    @abc.abstractmethod
    def accept(self, header: UploadHeader, sink: UploadSink, received: Received) -> int:
        """Take a verified (and folded) upload into the attempt; return the weight to record for its train loss."""

    def receive(self, worker: str, tag: int, message: SecureMessage) -> int:
        """Take a secure-aggregation message; return the bytes it carried."""
        raise FailedPrecondition("this run does not aggregate securely; no key exchange is open")

    @abc.abstractmethod
    def drop(self, worker: str) -> None:
        """`worker` left the run: stop waiting for it (what it already sent may still count)."""

    @abc.abstractmethod
    def step(self, now: float) -> Closing | None:
        """Close what is due; once everything is in, how to finish the attempt, else None. Raises
        AggregationFailed."""

    @abc.abstractmethod
    def progress(self) -> Hashable:
        """Changes whenever a step closes (the phase machine steps until it stops changing)."""

    @property
    @abc.abstractmethod
    def missing(self) -> tuple[str, ...]:
        """Participants whose update is not (or will not be) in the aggregate."""

    def discard(self) -> None:
        """Release what the attempt holds (spool files, journals); the default holds none."""


class Aggregator(abc.ABC):
    """Makes one RoundAggregation per round attempt."""

    @abc.abstractmethod
    def open(self, plan: AttemptPlan) -> RoundAggregation: ...

    def allow(self, identities: Mapping[str, bytes]) -> None:
        """The run's allow-list was amended: attempts opened from now on know these identity keys (by worker)."""
