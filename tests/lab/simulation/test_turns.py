"""Turns: one client at a time, round robin in a fixed order; WAIT passes the turn, work keeps it."""

from __future__ import annotations

import threading
import time

import pytest

from fedlora_lab.simulation.turns import Turns, TurnsStopped


def _taken_in(turns: Turns, member: str, timeout: float = 5.0) -> threading.Event:
    """An event set once `member` got the turn in another thread (as its poll would)."""
    taken = threading.Event()

    def take() -> None:
        turns.take(member)
        taken.set()

    threading.Thread(target=take, daemon=True).start()
    return taken


def test_the_turn_goes_round_robin_in_the_given_order_and_work_keeps_it() -> None:
    turns = Turns(["clinical", "legal", "finance"])
    holders = [turns.holder]

    turns.answered("clinical", work=False)
    holders.append(turns.holder)
    turns.answered("legal", work=True)
    holders.append(turns.holder)
    turns.answered("legal", work=False)
    holders.append(turns.holder)
    turns.answered("finance", work=False)
    holders.append(turns.holder)

    assert holders == ["clinical", "legal", "legal", "finance", "clinical"]


def test_a_client_waits_for_its_turn_until_the_holder_is_told_to_wait() -> None:
    turns = Turns(["clinical", "legal"])
    taken = _taken_in(turns, "legal")

    blocked = not taken.wait(0.2)
    turns.answered("clinical", work=False)

    assert blocked
    assert taken.wait(5.0)


def test_a_retired_holder_passes_the_turn_and_the_last_one_leaves_nobody_holding_it() -> None:
    turns = Turns(["clinical", "legal", "finance"])

    turns.retire("clinical")
    after_first = turns.holder
    turns.retire("finance")  # not the holder: the turn stays
    after_second = turns.holder
    turns.retire("legal")

    assert after_first == "legal"
    assert after_second == "legal"
    assert turns.holder is None
    assert turns.active == ()


def test_a_retired_client_is_skipped_by_the_round_robin() -> None:
    turns = Turns(["clinical", "legal", "finance"])

    turns.retire("legal")
    turns.answered("clinical", work=False)

    assert turns.holder == "finance"


def test_stop_wakes_a_waiting_client_and_refuses_every_later_turn() -> None:
    turns = Turns(["clinical", "legal"])
    errors: list[BaseException] = []

    def take() -> None:
        try:
            turns.take("legal")
        except TurnsStopped as exc:
            errors.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    turns.stop()
    thread.join(5.0)

    assert len(errors) == 1
    with pytest.raises(TurnsStopped):
        turns.take("clinical")
    assert turns.pause("clinical", 10.0) is True


def test_a_pause_after_wait_while_others_have_work_returns_at_once() -> None:
    turns = Turns(["clinical", "legal", "finance"])
    turns.answered("clinical", work=False)

    started = time.monotonic()
    stopped = turns.pause("clinical", 5.0)

    assert stopped is False
    assert time.monotonic() - started < 1.0


def test_a_pause_after_a_whole_round_of_waits_sleeps_as_asked() -> None:
    turns = Turns(["clinical", "legal"])
    turns.answered("clinical", work=False)
    turns.answered("legal", work=False)

    started = time.monotonic()
    turns.pause("legal", 0.3)

    assert time.monotonic() - started >= 0.3


def test_a_pause_a_client_chose_after_work_gives_up_the_turn_and_sleeps() -> None:
    turns = Turns(["clinical", "legal"])
    turns.answered("clinical", work=True)
    taken = _taken_in(turns, "legal")

    started = time.monotonic()
    turns.pause("clinical", 0.3)

    assert time.monotonic() - started >= 0.3
    assert taken.wait(5.0)


def test_members_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Turns(["clinical", "clinical"])
