"""The executors' contract, which every stage that hands them cells relies on: each cell comes back with its
result as soon as it is done, and what a cell raises reaches the caller."""

from __future__ import annotations

import threading

import pytest

from fedlora_lab.experiment.executors import LocalExecutor, RayExecutor


def test_the_local_executor_yields_each_cell_with_its_result_as_it_finishes() -> None:
    second_done = threading.Event()

    def square(cell: int) -> int:
        if cell == 1:
            assert second_done.wait(timeout=60), "cell 2 never finished"
        elif cell == 2:
            second_done.set()
        return cell * cell

    with LocalExecutor(parallel=2) as executor:
        finished = list(executor.run(square, [1, 2]))
        none = list(executor.run(square, []))

    assert finished == [(2, 4), (1, 1)]
    assert none == []


def test_what_a_cell_raises_reaches_the_caller() -> None:
    def fail(cell: int) -> int:
        raise ValueError(f"cell {cell}")

    with LocalExecutor(parallel=1) as executor, pytest.raises(ValueError, match="cell 7"):
        list(executor.run(fail, [7]))


def test_ray_is_not_started_for_nothing_to_run() -> None:
    import ray

    with RayExecutor(parallel=1) as executor:
        none = list(executor.run(str, []))

    assert none == []
    assert not ray.is_initialized()  # an experiment with every run done (resumed) starts no Ray
