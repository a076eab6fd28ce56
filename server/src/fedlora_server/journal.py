"""Reading the run's journal (what operators asked of it, `RunEvent`s in the store): the stop it is under."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from fedlora_server.store import RunEvent

__all__ = ["StopRequest", "stop_request"]


@dataclass(frozen=True)
class StopRequest:
    now: bool
    """End at once, dropping the attempt in progress; else after the round in progress."""
    reason: str


def stop_request(events: Sequence[RunEvent]) -> StopRequest | None:
    """The stop asked for since the run was last retried, if any (a later request replaces an earlier one)."""
    found: StopRequest | None = None
    for event in events:
        if event.kind == "retried":
            found = None
        elif event.kind == "stop_requested":
            detail = json.loads(event.detail)
            found = StopRequest(bool(detail.get("now")), str(detail.get("reason", "")))
    return found
