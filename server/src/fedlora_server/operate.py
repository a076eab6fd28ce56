"""`fedlora-server status|stop|retry|amend`: an operator's commands on a run, through its state directory.

Each reads run.yaml (and the same FEDLORA_* variables and flags as the coordinator) to find the state; none
needs the coordinator to run, and a running one takes stop and amend at its next tick. A refusal is exit 2
with one line per reason.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.config import RunSettings
from fedlora_server.control import ControlError, amend_run, request_stop, retry_run
from fedlora_server.journal import StopRequest
from fedlora_server.run_status import read_status
from fedlora_server.state_check import DATABASE
from fedlora_server.store import CoordinatorStore, SqliteStore, StateError

__all__ = ["COMMANDS"]

Command = Callable[[Sequence[str]], int]


def _flag(args: list[str], name: str) -> bool:
    """Take a bare flag out of `args`; whether it was there."""
    if name in args:
        args.remove(name)
        return True
    return False


def _option(args: list[str], name: str, default: str) -> str:
    """Take `name VALUE` out of `args`; its value, or `default`."""
    if name in args:
        at = args.index(name)
        if at + 1 >= len(args):
            raise ConfigError(f"{name} needs a value")
        value = args[at + 1]
        del args[at : at + 2]
        return value
    return default


def _settings(command: str, args: Sequence[str]) -> RunSettings:
    """run.yaml and its overrides; `key=value` words are flags too (`amend --config run.yaml rounds=12`)."""
    flags: list[str] = []
    for word in args:
        key, equals, value = word.partition("=")
        flags += [f"--{key}", value] if equals and not word.startswith("-") else [word]
    if "--config" not in flags and not any(f.startswith("--config=") for f in flags):
        raise ConfigError(f"usage: fedlora-server {command} --config run.yaml [...]")
    return load_settings(RunSettings, flags)


def _refused(command: str, why: str) -> int:
    lines = why.splitlines() or [why]
    sys.stderr.write("".join(f"fedlora-server {command}: {line}\n" for line in lines))
    return 2


def _open(settings: RunSettings, *, read_only: bool) -> CoordinatorStore:
    database = settings.state_dir / DATABASE
    if not database.exists():
        raise ControlError(f"{settings.state_dir}: holds no run (no {DATABASE}); start the coordinator first")
    return SqliteStore.snapshot(database) if read_only else SqliteStore(database)


def _operate(command: str, argv: Sequence[str], act: Callable[[RunSettings, list[str]], int]) -> int:
    args = list(argv)
    try:
        return act(_settings(command, [a for a in args if a not in ("--json", "--now")]), args)
    except (ConfigError, ControlError, StateError) as exc:
        return _refused(command, str(exc))


def status(argv: Sequence[str]) -> int:
    """`status --config run.yaml [--json]`: phase, round, attempt, sites, last commit, failure, journal."""

    def act(settings: RunSettings, args: list[str]) -> int:
        from fedlora_server.probe import probe

        store = _open(settings, read_only=True)
        try:
            found = read_status(store, rounds=settings.rounds)
        finally:
            store.close()
        if found is None:
            raise ControlError(f"{settings.state_dir}: holds no run yet")
        try:
            answer = probe(settings.listen).status if settings.listen.port else "not asked (listen.port is 0)"
        except (OSError, ValueError) as exc:
            answer = f"not asked ({exc})"
        found = replace(found, coordinator=answer)
        if "--json" in args:
            sys.stdout.write(json.dumps(found.as_json(), indent=1) + "\n")
        else:
            sys.stdout.write("".join(line + "\n" for line in found.lines()))
        return 0

    return _operate("status", argv, act)


def stop(argv: Sequence[str]) -> int:
    """`stop --config run.yaml [--now] [--reason TEXT]`: end the run after the round in progress (or at once)."""
    args = list(argv)
    try:
        reason = _option(args, "--reason", "")
    except ConfigError as exc:
        return _refused("stop", str(exc))

    def act(settings: RunSettings, rest: list[str]) -> int:
        now = "--now" in rest
        store = _open(settings, read_only=False)
        try:
            request_stop(store, settings, StopRequest(now, reason), now=time.time())
        finally:
            store.close()
        when = "at once" if now else "after the round in progress"
        sys.stdout.write(f"stop requested: run {settings.run_id} ends {when}; workers are told it finished\n")
        return 0

    return _operate("stop", args, act)


def retry(argv: Sequence[str]) -> int:
    """`retry --config run.yaml`: a failed or stopped run resumes from its last committed round at its next start."""

    def act(settings: RunSettings, args: list[str]) -> int:
        store = _open(settings, read_only=False)
        try:
            ended = retry_run(store, settings, now=time.time())
        finally:
            store.close()
        sys.stdout.write(
            f"retried: run {settings.run_id} resumes from its last committed round at the coordinator's next "
            f"start (it had ended: {ended})\n"
        )
        return 0

    return _operate("retry", argv, act)


def amend(argv: Sequence[str]) -> int:
    """`amend --config run.yaml [rounds=12 ...]`: pin the run to these settings where an amendment may change it."""

    def act(settings: RunSettings, args: list[str]) -> int:
        store = _open(settings, read_only=False)
        try:
            changed = amend_run(store, settings, now=time.time())
        finally:
            store.close()
        if not changed:
            sys.stdout.write(f"nothing to amend: run {settings.run_id} already has these settings\n")
        for change in changed:
            sys.stdout.write(f"amended: {change.line()}\n")
        return 0

    return _operate("amend", argv, act)


COMMANDS: dict[str, Command] = {"status": status, "stop": stop, "retry": retry, "amend": amend}
"""The operator's commands, by name (`fedlora-server NAME ...`)."""
