"""The executors' contract, which every stage that hands them cells relies on: each cell comes back with its
result as soon as it is done, and what a cell raises reaches the caller."""

from __future__ import annotations

import threading

import pytest

from fedlora_lab.experiment.executors import LocalExecutor, RayExecutor


def test_the_local_executor_yields_each_cell_with_its_result_as_it_finishes() -> None:
    first_received = threading.Event()

    def square(cell: int) -> int:
        if cell == 1:  # cell 1 cannot finish before the caller holds a result, so that one must be cell 2's
            assert first_received.wait(timeout=60), "the caller never received cell 2's result"
        return cell * cell

    with LocalExecutor(parallel=2) as executor:
        finished = executor.run(square, [1, 2])
        first = next(finished)
        first_received.set()
        rest = list(finished)
        none = list(executor.run(square, []))

    assert first == (2, 4)
    assert rest == [(1, 1)]
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
