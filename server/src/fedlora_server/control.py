"""What an operator does to a run through its state, whether or not its coordinator runs: amend the settings,
retry a failed or stopped run, ask it to stop. Each is journalled in the store (`RunEvent`); a running
coordinator takes the journal's new entries at its next tick (`RunControl`), a starting one from the state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import structlog

from fedlora_server.auth import Authenticator
from fedlora_server.config import RunSettings, WorkerEntry
from fedlora_server.journal import StopRequest, stop_request
from fedlora_server.machine import PhaseMachine
from fedlora_server.pinning import PINNED, Change, amend_refusal, changes, pinned
from fedlora_server.store import CoordinatorStore, RunEvent, RunRecord

__all__ = ["ControlError", "RunControl", "amend_run", "amended_settings", "request_stop", "retry_run"]

log = structlog.get_logger()


class ControlError(Exception):
    """An operator's request the run refuses; the message says why, one line per reason."""


def _run_of(store: CoordinatorStore, settings: RunSettings) -> RunRecord:
    run = store.load_run()
    if run is None:
        raise ControlError(f"{settings.state_dir}: holds no run yet; start the coordinator first")
    if run.run_id != settings.run_id:
        raise ControlError(f"{settings.state_dir}: holds run {run.run_id!r}, not {settings.run_id!r}")
    return run


def amend_run(store: CoordinatorStore, settings: RunSettings, *, now: float) -> list[Change]:
    """Pin the run to `settings` where they differ only as an amendment may; the changes made (none: nothing to do).

    ControlError naming every field that no amendment may change."""
    run = _run_of(store, settings)
    config = json.loads(run.config_json)
    stored = pinned(config)
    found = changes(stored, pinned(settings))
    refusals = [why for change in found if (why := amend_refusal(change, stored)) is not None]
    if refusals:
        raise ControlError("\n".join(refusals))
    if found:
        asked = settings.model_dump(mode="json")
        amended = {**config, **{field: asked[field] for field in PINNED}}
        store.amend_run(json.dumps(amended), RunEvent(now, "amended", json.dumps([c.as_json() for c in found])))
    return found


def retry_run(store: CoordinatorStore, settings: RunSettings, *, now: float) -> str:
    """Let a failed (or stopped) run go on from its last committed round at its next start; what it ended with."""
    run = _run_of(store, settings)
    stop = stop_request(store.events())
    if not run.failure and stop is None:
        raise ControlError("the run has neither failed nor been stopped: nothing to retry")
    ended = run.failure or f"stopped: {stop.reason if stop else ''}"
    store.reopen_run(RunEvent(now, "retried", json.dumps({"ended": ended})))
    return ended


def request_stop(store: CoordinatorStore, settings: RunSettings, request: StopRequest, *, now: float) -> None:
    """Journal the request; the coordinator ends the run after the round in progress (or at once with `now`)."""
    run = _run_of(store, settings)
    if run.failure:
        raise ControlError(f"the run has already failed ({run.failure}): nothing to stop")
    store.record_event(RunEvent(now, "stop_requested", json.dumps({"now": request.now, "reason": request.reason})))


def amended_settings(settings: RunSettings, stored_config: Mapping[str, Any]) -> RunSettings:
    """`settings` with what amendments may change taken from the config the state holds now."""
    return settings.model_copy(
        update={
            "rounds": int(stored_config["rounds"]),
            "min_workers": int(stored_config["min_workers"]),
            "workers": tuple(WorkerEntry.model_validate(w) for w in stored_config["workers"]),
        }
    )


class RunControl:
    """A running coordinator's side: each tick, the journal's new entries are put into effect."""

    def __init__(
        self,
        *,
        store: CoordinatorStore,
        machine: PhaseMachine,
        authenticator: Authenticator,
        settings: RunSettings,
    ) -> None:
        self._store = store
        self._machine = machine
        self._authenticator = authenticator
        self._settings = settings
        self._seen = len(store.events())  # what is journalled already, the machine took from the state at start

    def poll(self) -> None:
        events = self._store.events()
        fresh, self._seen = events[self._seen :], len(events)
        for event in fresh:
            if event.kind == "amended":
                self._amend()
            elif event.kind == "stop_requested" and (request := stop_request([event])) is not None:
                log.info("stop_requested", now=request.now, reason=request.reason)
                self._machine.stop(now=request.now, reason=request.reason)

    def _amend(self) -> None:
        run = self._store.load_run()
        assert run is not None
        settings = amended_settings(self._settings, json.loads(run.config_json))
        self._authenticator.allow(settings.workers)
        self._machine.amend(settings)
        self._settings = settings
        log.info("run_amended", rounds=settings.rounds, workers=[w.id for w in settings.workers])
