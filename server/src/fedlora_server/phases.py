"""The phases of a run, each carrying exactly the state it needs (no optional fields standing in for it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedlora_server.aggregation import Closing, RoundAggregation
from fedlora_server.store import RoundRecord
from fedlora_server.versions import GlobalModel

__all__ = [
    "Admission",
    "Backoff",
    "Committing",
    "Evaluation",
    "Finished",
    "Initialize",
    "Phase",
    "PhaseName",
    "Training",
    "round_of",
]

PhaseName = Literal["admission", "initialize", "train", "commit", "backoff", "evaluate", "finished"]


@dataclass
class Admission:
    deadline_at: float
    name: PhaseName = "admission"


@dataclass
class Initialize:
    initializer: str
    started_at: float
    deadline_at: float
    name: PhaseName = "initialize"


@dataclass
class Training:
    record: RoundRecord
    aggregation: RoundAggregation
    base: GlobalModel
    name: PhaseName = "train"


@dataclass
class Committing:
    """The attempt has all it waits for: its mean is taken (unmasked) and written as the next version by one
    thread, outside the coordinator's lock (at 42M parameters the mean takes a third of a second and the write
    and fsync a second), so polls, health checks and others' requests are answered meanwhile: every worker
    waits, no upload is taken."""

    training: Training
    closing: Closing
    writer: int
    """The thread whose request closed the round (`threading.get_ident`): it writes the version once it has
    released the lock, and no other request waits for the write."""
    writing: bool = False
    stop_now: bool = False
    """An operator asked the run to stop now: once the version stands, the run ends instead of evaluating it."""
    name: PhaseName = "commit"


@dataclass
class Backoff:
    """A round whose attempt failed waits before the next one, longer after each failure: a fault that
    repeats (a liar, a full disk) slows the retries down instead of spinning them."""

    round: int
    base: GlobalModel
    resume_at: float
    reason: str
    """Why the last attempt failed."""
    name: PhaseName = "backoff"


@dataclass
class Evaluation:
    round: int
    record: RoundRecord | None
    """The round's committed attempt; None for round 0, the base model."""
    participants: tuple[str, ...]
    started_at: float
    deadline_at: float
    model: GlobalModel
    done: set[str] = field(default_factory=set)
    name: PhaseName = "evaluate"


@dataclass
class Finished:
    round: int
    failure: str | None = None
    """Why the run ended before its last round; None when it finished them (or was stopped)."""
    reason: str = ""
    """Why the run is over, as the workers are told."""
    name: PhaseName = "finished"


Phase = Admission | Initialize | Training | Committing | Backoff | Evaluation | Finished


def round_of(phase: Phase) -> int:
    """The round a phase belongs to (0 before training starts)."""
    match phase:
        case Training(record=record) | Committing(training=Training(record=record)):
            return record.round
        case Backoff(round=round_) | Evaluation(round=round_) | Finished(round=round_):
            return round_
        case _:
            return 0
