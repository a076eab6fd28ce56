"""kill -9 at moments we pick from the logs: the coordinator in every phase, a worker in every phase.

Real `fedlora-server` and `fedlora-worker` processes on the tiny lab model, secure aggregation on,
no DP noise, fixed seeds, every round audited (tests/e2e/processes.py).

Coordinator: one run in which the coordinator is SIGKILLed in each phase in turn (admission,
initialize, training, each secure stage, mid-upload, just after a commit, evaluation, audit),
restarted each time on the same state directory. Every worker must rejoin by itself after each
restart, the run must finish, and the final adapter must be bit-identical to the uninterrupted
reference run's (conftest.py): a retried attempt resends the same update, rounded the same way.
The same run also dies inside commits, in each window a commit passes (version written but not
renamed, renamed but not recorded, recorded but not linked, linked but its round not booked):
there the coordinator kills itself, started through commit_windows.py; the restart adopts,
books or re-links what the kill left, and only the expected versions are committed, nothing set
aside or left half-written.

Worker: one run in which one worker is SIGKILLed in each phase (initialize, training, each
secure stage, mid-upload, evaluation) and started again at once. Each round completes without it
when enough survive, or fails cleanly and is retried; the restarted worker is back in a later round.
Each matrix prints its table (phase -> what happened).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from fedlora_lab.model_factory import MadeModel
from tests.e2e.conftest import ReferenceRun
from tests.e2e.processes import COORDINATOR, Event, Federation, federation, is_event, tiny_plan

WORKERS = ("clinical", "finance", "legal")


@dataclass(frozen=True)
class Kill:
    """Kill the coordinator at the first event of `source`'s log (the coordinator's, or a worker's) that `when`
    matches; or, with `dies_in` (window, version), let it kill itself in that window of that commit."""

    phase: str
    when: Callable[[Event], bool] = lambda event: False
    source: str = COORDINATOR
    dies_in: tuple[str, int] | None = None
    costs_attempt: bool | None = None
    """Whether the kill fails an attempt of round 1; None: as the coordinator's phase at the kill says."""
    too_late: Callable[[Event], bool] | None = None
    """A coordinator event after which a worker's `when` cannot come any more: the kill is then, not never."""


def _secure(stage: str) -> Callable[[Event], bool]:
    return is_event("secagg_stage", stage=stage)


def _masked_upload(event: Event) -> bool:
    return event.get("event") == "upload_opened" and event.get("kind") == "masked"


def _audited_version(event: Event) -> bool:
    return event.get("event") == "evaluated" and event.get("version") == 1


COORDINATOR_KILLS = (
    Kill("admission", is_event("worker_joined")),
    Kill("initialize", is_event("initialize")),
    Kill("version 0 renamed into place, not recorded", dies_in=("renamed", 0), costs_attempt=False),
    Kill("training", is_event("round_started", round=1)),
    Kill("advertise", is_event("secagg_received", message="Advertisement")),
    Kill("share", _secure("share")),
    Kill("masked upload, mid-stream", _masked_upload),
    Kill("unmask", _secure("unmask")),
    Kill("version 1 written, not renamed", dies_in=("written", 1), costs_attempt=True),
    # The link moved, the round not yet booked as committed: a moment before "round_committed" is logged.
    Kill("version 1 linked, round not booked", dies_in=("linked", 1), costs_attempt=False),
    Kill("evaluation", is_event("metrics_reported", round=1)),
    # Workers audit a new version right after evaluating it ("evaluated" comes first, then the audit). Legal may
    # have audited and reported version 1 under the coordinator killed at the first report: then at round 2.
    Kill("audit", _audited_version, source="legal", too_late=is_event("round_started", round=2)),
    Kill("version 2 recorded, adapter still at version 1", dies_in=("recorded", 2), costs_attempt=False),
)
"""In run order. A commit window kills the coordinator started for it, so each closes a commit: at most one per version."""


def _wait_rejoined(fed: Federation, incarnation: dict[str, int]) -> None:
    """Until every worker has joined the coordinator's current incarnation (whose events follow the mark)."""
    seen: set[str] = set()
    while seen != set(WORKERS):
        event = fed.wait_for(
            COORDINATOR,
            lambda e: e.get("event") == "worker_joined" and e.get("worker_id") not in seen,
            after=incarnation,
            timeout_s=300,
        )
        seen.add(event["worker_id"])


def _wait_for_kill(fed: Federation, kill: Kill, after: dict[str, int]) -> None:
    """Until `kill.when` matches an event of its source after the mark, or the coordinator logged `too_late`."""
    deadline = time.monotonic() + 300
    while True:
        try:
            fed.wait_for(kill.source, kill.when, after=after, timeout_s=0.5)
            return
        except TimeoutError:
            coordinator = fed.events(COORDINATOR)[after.get(COORDINATOR, 0) :]
            if kill.too_late is not None and any(kill.too_late(e) for e in coordinator):
                return
            if time.monotonic() > deadline:
                raise


def _rejoined(log: Path) -> tuple[set[str], float | None]:
    """Who joined one incarnation of the coordinator, and how long after it listened the last of them did."""
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    listening = next(_at(e) for e in events if e.get("event") == "coordinator_listening")
    joined: dict[str, float] = {}
    for event in events:
        if event.get("event") == "worker_joined":
            joined.setdefault(event["worker_id"], _at(event))
    return set(joined), (max(joined.values()) - listening if joined else None)


def _at(event: Event) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


RECOVERY_EVENTS = {"artifact_adopted", "round_booked_as_committed", "adapter_link_repaired"}


def _costs_attempt(kill: Kill, last: str) -> bool:
    if kill.costs_attempt is not None:
        return kill.costs_attempt
    return last.startswith(("round_started 1", "secagg_stage 1"))


PHASE_EVENTS = (
    "coordinator_listening",
    "initialize",
    "round_started",
    "secagg_stage",
    "round_committed",
    "evaluation_started",
    "round_evaluated",
    "run_finished",
)
"""Events that open a phase (a restarted coordinator is in admission from `coordinator_listening` on)."""


def _phase_at(fed: Federation) -> str:
    """The coordinator's phase as its log tells it: the event that opened it, then the last one logged."""
    events = fed.events(COORDINATOR)
    opened = next((e for e in reversed(events) if e.get("event") in PHASE_EVENTS), {})
    text = " ".join(str(opened.get(k)) for k in ("event", "round", "stage") if k in opened)
    if events and events[-1] is not opened:
        text += f", then {events[-1].get('event')}"
    return text


def _adapter_digest(adapter: Path) -> tuple[str, bytes]:
    meta = json.loads((adapter / "fedlora.json").read_text())
    return meta["sha256"], (adapter / "adapter_model.safetensors").read_bytes()


def _table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@pytest.mark.slow
def test_a_coordinator_killed_in_every_phase_resumes_and_commits_the_uninterrupted_runs_adapter(
    lab_model: MadeModel, reference_run: ReferenceRun, tmp_path: Path
) -> None:
    # Prepare: the same federation as the reference, which runs meanwhile.
    phases: list[tuple[str, str]] = []
    with federation(tiny_plan(tmp_path / "killed", lab_model.path)) as fed:
        # Every 16 kB block on the workers' link waits 0.1 s: each stage lasts long enough to be caught in.
        fed.delay(0.1)
        fed.start_all()
        incarnation = fed.mark()

        # Execute: kill the coordinator in each phase in turn; restart it on the same state each time.
        for index, kill in enumerate(COORDINATOR_KILLS):
            if kill.dies_in is not None:  # it kills itself: nothing to wait for but its end
                fed.reap(COORDINATOR, 300)
                phases.append((kill.phase, _phase_at(fed)))
            else:
                if index:  # every phase from initialize on needs all three: each must have come back by itself
                    _wait_rejoined(fed, incarnation)
                after = incarnation if kill.source == COORDINATOR else fed.mark()
                _wait_for_kill(fed, kill, after)
                phases.append((kill.phase, _phase_at(fed)))
                fed.kill(COORDINATOR)
            incarnation = fed.mark()
            following = COORDINATOR_KILLS[index + 1] if index + 1 < len(COORDINATOR_KILLS) else None
            fed.start_coordinator(dies_in=None if following is None else following.dies_in)
        codes = fed.wait_exit(300)
        rejoins = [_rejoined(log) for log in fed.logs[COORDINATOR][1:]]
        report = json.loads((fed.out / "report.json").read_text())
        killed = _adapter_digest(fed.out / "adapter")
        restarts = len(fed.logs[COORDINATOR]) - 1
        failed_attempts = report["attempt_failures"]
        versions = sorted(p.name for p in (fed.out / "artifacts").iterdir())  # hidden names too
        recovered = {e["event"] for e in fed.events(COORDINATOR)} & RECOVERY_EVENTS
    reference_codes = reference_run.finished()
    reference = _adapter_digest(reference_run.adapter())
    rows = [
        (phase, last, f"{len(joined)} of 3 rejoined the restarted coordinator, the last after {seconds or 0:.1f} s")
        for (phase, last), (joined, seconds) in zip(phases, rejoins, strict=True)
    ]
    print(_table("coordinator SIGKILLed in each phase", rows, ("phase", "coordinator's last event", "outcome")))

    # Assert: everyone finished cleanly, every round is in the report, and the adapter is the reference's, bit for bit.
    assert set(codes.values()) == {0}, codes
    assert set(reference_codes.values()) == {0}, reference_codes
    assert restarts == len(COORDINATOR_KILLS)
    assert all(joined == set(WORKERS) for joined, _ in rejoins), rows
    # Each commit window was the one the coordinator died in, by its own SIGKILL.
    windows = [(k.dies_in, last) for k, (_, last) in zip(COORDINATOR_KILLS, phases, strict=True) if k.dies_in]
    assert all(last.endswith("then killed_in_commit_window") for _, last in windows), windows
    assert [code for code in fed.exits[COORDINATOR] if code != -9] == [0]
    # Each kill inside round 1's training cost exactly its attempt, and nothing but the three versions was
    # committed: no version set aside, no temp directory left behind.
    in_training = sum(1 for k, (_, last) in zip(COORDINATOR_KILLS, phases, strict=True) if _costs_attempt(k, last))
    assert len([f for f in failed_attempts if f["round"] == 1]) == in_training >= 5, phases
    assert versions == ["v000000", "v000001", "v000002"]
    assert os.readlink(fed.out / "adapter") == "artifacts/v000002"
    assert recovered == RECOVERY_EVENTS  # version 0 adopted, round 1 booked, the link to version 2 repaired
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["memorization"] is not None for r in report["rounds"])
    assert killed[0] == reference[0], failed_attempts
    assert killed[1] == reference[1]


@dataclass(frozen=True)
class WorkerKill:
    phase: str
    when: Callable[[Event], bool]
    """A coordinator event; the victim is the worker it names, else the next alive one."""
    slow_link: bool = False
    """Hold every 16 kB block on the workers' link for 0.25 s, so the victim is caught before its next message."""
    before_its_update: bool = False
    """The kill must land before the coordinator accepts the victim's update of that round; one that lands later
    (a fast victim sends its keys, shares and masked update within milliseconds) is tried again next time."""


def _from(name: str, message: str) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == name and e.get("message", e.get("kind")) == message


WORKER_KILLS = (
    WorkerKill("initialize", is_event("initialize")),
    WorkerKill("training", lambda e: e.get("event") == "round_started"),
    WorkerKill("advertise (keys sent)", _from("secagg_received", "Advertisement"), True, True),
    WorkerKill("share (shares sent)", _from("secagg_received", "KeyShares"), True, True),
    WorkerKill("masked upload, mid-stream", _from("upload_opened", "masked"), True, True),
    WorkerKill("unmask", _secure("unmask")),
    WorkerKill("evaluation and audit", lambda e: e.get("event") == "round_committed"),
)


KILL_TRIES = 4


def _landed_after_its_update(events: list[Event], victim: str, round_: int) -> bool:
    """Whether the coordinator accepted `victim`'s update of `round_` before the victim joined again (`events`
    from the kill's trigger on): then the kill came after what it meant to interrupt."""
    for event in events:
        if is_event("worker_joined", worker_id=victim)(event):
            return False
        if is_event("update_accepted", worker_id=victim, round=round_)(event):
            return True
    return False


def _outcome(report: dict, after: list[Event], phase: str, round_: int, victim: str) -> str:
    """What became of the round a worker was killed in: the coordinator's report and its events after the kill."""
    if phase == "initialize":
        by = next(e["worker_id"] for e in after if e.get("event") == "initialized")
        return "initialized by it once restarted" if by == victim else f"{by} initialized instead"
    if phase.startswith("evaluation"):
        reported = any(is_event("metrics_reported", worker_id=victim, round=round_)(e) for e in after)
        return "evaluated with its report (back in time)" if reported else "evaluated without its report"
    failed = [f for f in report["attempt_failures"] if f["round"] == round_]
    done = next((r for r in report["rounds"] if r["round"] == round_), None)
    if done is None:
        return "never completed"
    without = victim in done["dropped"] or victim not in done["participants"]
    how = "without its update" if without else "with its update"
    return f"{len(failed)} failed attempt(s), then completed {how}" if failed else f"completed {how}"


@pytest.mark.slow
def test_a_worker_killed_in_every_phase_costs_at_most_its_round_attempt_and_rejoins_the_next_round(
    lab_model: MadeModel, tmp_path: Path
) -> None:
    # Prepare: two of three workers carry a round (threshold 2); stages close 4 s after they open.
    plan = tiny_plan(
        tmp_path / "workers",
        lab_model.path,
        rounds=12,  # 7 kills, a round or two each, and room for kills that landed late to be tried again
        min_workers=2,
        timeouts={"phase_base_s": 4, "train_s": 8},
    )
    kills: list[tuple[str, str, int, int]] = []  # phase, victim, round, the coordinator's events until the kill
    with federation(plan) as fed:
        fed.start_all()
        fed.wait_for(COORDINATOR, is_event("initialize"), timeout_s=300)
        alive = list(WORKERS)

        # Execute: kill a worker in each phase and start it again at once; kill the next only once it is back.
        mark = {COORDINATOR: 0}
        for kill in WORKER_KILLS:
            for _ in range(KILL_TRIES):
                if kill.slow_link:
                    fed.delay(0.25)
                event = fed.wait_for(COORDINATOR, kill.when, after=mark, timeout_s=300)
                victim = event.get("worker_id") or event.get("initializer") or alive[0]
                round_ = int(event.get("round", 0))
                seen = len(fed.events(COORDINATOR))
                fed.kill(victim)
                fed.delay(0)
                triggered, mark = mark, fed.mark()
                fed.start_worker(victim)
                fed.wait_for(victim, is_event("joined"), after=mark, timeout_s=300)
                alive = [w for w in alive if w != victim] + [victim]
                fed.wait_for(COORDINATOR, is_event("worker_joined", worker_id=victim), after=mark, timeout_s=300)
                mark = fed.mark()
                since = fed.events(COORDINATOR)[triggered[COORDINATOR] :]
                if not (kill.before_its_update and _landed_after_its_update(since, victim, round_)):
                    break
            kills.append((kill.phase, victim, round_, seen))
        codes = fed.wait_exit(300)
        report = json.loads((fed.out / "report.json").read_text())
        events = fed.events(COORDINATOR)
        took_part = {
            (e["worker_id"], e["round"])
            for e in events
            if e.get("event") == "secagg_received" and e.get("message") == "Advertisement"
        }

    rows = []
    for phase, victim, round_, seen in kills:
        back = min((r for w, r in took_part if w == victim and r > round_), default=None)
        rows.append(
            (phase, victim, str(round_), _outcome(report, events[seen:], phase, round_, victim), f"round {back}")
        )
    print(_table("a worker SIGKILLed in each phase", rows, ("phase", "worker", "round", "its round", "back in")))

    # Assert: the run finished with every process exiting 0, every round committed, and each killed
    # worker took part in a later round than the one it was killed in.
    assert set(codes.values()) == {0}, codes
    assert report["failure"] is None
    assert [r["round"] for r in report["rounds"]] == list(range(1, 13))
    assert all(back != "round None" for *_, back in rows), rows
    # A worker gone after sending its keys, its shares or half its masked update cannot be in that attempt's sum.
    secure = [outcome for phase, _, _, outcome, _ in rows if phase.startswith(("advertise", "share", "masked"))]
    assert all("without its update" in o or "failed attempt" in o for o in secure), rows
