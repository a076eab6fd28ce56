"""Where a run stands, read from its state alone (a coordinator need not run): what `fedlora-server status` prints.

The state is the truth of a run: its phase and round are those of its latest round record, its sites those
that joined (and why any left), its last commit the latest version, and what operators did, its journal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fedlora_server.journal import stop_request
from fedlora_server.store import CoordinatorStore

__all__ = ["RunStatus", "SiteStatus", "read_status"]

State = Literal["new", "running", "finished", "stopped", "failed"]


@dataclass(frozen=True)
class SiteStatus:
    id: str
    examples: int
    left: str | None


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: State
    rounds: int
    round: int
    """The round in progress, or the last one the run reached."""
    attempt: int
    phase: str
    """What the latest round record says: training, evaluating, completed, failed (or admission before any)."""
    last_commit: dict[str, Any] | None
    failure: str | None
    stopped: str | None
    sites: list[SiteStatus]
    eval_loss: float | None = None
    """The held-out loss of the latest evaluated round (round 0: the base model)."""
    journal: list[dict[str, Any]] = field(default_factory=list)
    coordinator: str | None = None
    """What the coordinator's health service answers (SERVING, NOT_SERVING, UNAVAILABLE...), when asked."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        head = {
            "new": "started, no round yet",
            "running": f"round {self.round} of {self.rounds}, attempt {self.attempt}: {_PHASES.get(self.phase, self.phase)}",
            "finished": f"finished: {self.round} of {self.rounds} rounds",
            "stopped": f"stopped at round {self.round} of {self.rounds}: {self.stopped}",
            "failed": f"failed at round {self.round} of {self.rounds}: {self.failure}",
        }[self.state]
        out = [f"run {self.run_id}: {head}"]
        if self.coordinator is not None:
            out.append(f"coordinator: {self.coordinator}")
        if self.last_commit is not None:
            c = self.last_commit
            out.append(f"last commit: version {c['version']} (round {c['round']}) at {c['at']}")
        for site in self.sites:
            out.append(f"site {site.id}: {'left: ' + site.left if site.left else 'joined'} ({site.examples} examples)")
        for entry in self.journal:
            out.append(f"{entry['at']} {entry['kind']}: {entry['detail']}")
        return out


_PHASES = {
    "training": "training",
    "evaluating": "committed, evaluating",
    "completed": "completed, the next round not started",
    "failed": "failed, the next attempt not started",
}


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def read_status(store: CoordinatorStore, *, rounds: int) -> RunStatus | None:
    """The run the store holds, or None for a store that holds none; `rounds` as the run's settings say."""
    run = store.load_run()
    if run is None:
        return None
    records = store.rounds()
    last = records[-1] if records else None
    latest = store.latest_artifact()
    events = store.events()
    stop = stop_request(events)
    done = last is not None and last.status == "completed" and last.round >= rounds
    state: State = (
        "failed"
        if run.failure
        else "stopped"
        if stop is not None
        else "finished"
        if done
        else "running"
        if last is not None
        else "new"
    )
    return RunStatus(
        run_id=run.run_id,
        state=state,
        rounds=rounds,
        round=0 if last is None else last.round,
        attempt=0 if last is None else last.attempt,
        phase="admission" if last is None else last.status,
        last_commit=None
        if latest is None
        else {"version": latest.version, "round": latest.round, "at": _when(latest.committed_at)},
        failure=run.failure or None,
        stopped=None if stop is None else (stop.reason or "by the operator"),
        sites=[SiteStatus(w.worker_id, w.num_examples, w.left_reason or None) for w in store.workers()],
        eval_loss=next((r.eval_loss for r in reversed(records) if r.eval_loss is not None), None),
        journal=[{"at": _when(e.at), "kind": e.kind, "detail": json.loads(e.detail)} for e in events],
    )
