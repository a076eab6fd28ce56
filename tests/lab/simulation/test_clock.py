"""The simulation's clock: wall pace while the cores serve every working site, slower by their share beyond."""

from __future__ import annotations

import time

import pytest

from fedlora_lab.simulation import ContendedClock


class _Wall:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_keeps_wall_pace_until_more_sites_work_than_the_cores_serve() -> None:
    wall = _Wall()
    clock = ContendedClock(cores=2, threads=1, start=1_000.0, wall=wall)

    wall.now += 10  # nobody works: 10 s
    clock.working("a", True)
    clock.working("b", True)
    wall.now += 10  # two sites on two cores: 10 s
    clock.working("c", True)
    wall.now += 30  # three on two: each gets 2/3 of a core: 20 s
    clock.working("a", False)
    wall.now += 5  # two again: 5 s

    assert clock() == pytest.approx(1_000.0 + 10 + 10 + 20 + 5)


def test_each_sites_threads_count_against_the_cores() -> None:
    wall = _Wall()
    clock = ContendedClock(cores=4, threads=4, start=0.0, wall=wall)
    clock.working("a", True)
    clock.working("b", True)

    wall.now += 8

    assert clock.pace == 0.5
    assert clock() == pytest.approx(4.0)


def test_a_site_marked_twice_counts_once_and_an_idle_one_not_at_all() -> None:
    clock = ContendedClock(cores=1, threads=1, wall=_Wall())

    clock.working("a", True)
    clock.working("a", True)
    clock.working("b", False)

    assert clock.pace == 1.0


def test_the_clock_never_runs_backwards_and_starts_at_the_epoch_time() -> None:
    clock = ContendedClock(cores=1, threads=1)
    clock.working("a", True)
    clock.working("b", True)

    readings = [clock() for _ in range(1000)]

    assert readings == sorted(readings)
    assert abs(readings[0] - time.time()) < 60


@pytest.mark.parametrize(("cores", "threads"), [(0, 1), (1, 0)])
def test_cores_and_threads_must_be_positive(cores: int, threads: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        ContendedClock(cores=cores, threads=threads)
