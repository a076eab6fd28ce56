"""Where an experiment's cells run: threads of this process (``local``).

A cell is the argument of one function; an executor calls the function on every cell of a list,
at most ``parallel`` at a time, and yields each cell with its result as soon as it is done, so the
caller stores every result the moment it exists. The grid of (method, seed) runs is one such list;
any other stage of an experiment hands its own cells to the same executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["CellExecutor", "LocalExecutor"]

Cell = TypeVar("Cell")
Result = TypeVar("Result")


class CellExecutor(ABC):
    """Runs lists of independent cells; open one per experiment (``with``) and hand it every list."""

    @abstractmethod
    def run(self, fn: Callable[[Cell], Result], cells: Sequence[Cell]) -> Iterator[tuple[Cell, Result]]:
        """``(cell, fn(cell))`` for every cell, in the order they finish; what ``fn`` raises is raised here."""

    def shutdown(self) -> None:
        """Release what the executor holds; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


class LocalExecutor(CellExecutor):
    """Threads of this process: a run's work is done by child processes (the federation, the audit), so a
    thread per cell only waits on them."""

    def __init__(self, *, parallel: int) -> None:
        self._parallel = parallel

    def run(self, fn: Callable[[Cell], Result], cells: Sequence[Cell]) -> Iterator[tuple[Cell, Result]]:
        with ThreadPoolExecutor(max_workers=self._parallel, thread_name_prefix="experiment-cell") as pool:
            futures = {pool.submit(fn, cell): cell for cell in cells}
            for future in as_completed(futures):
                yield futures[future], future.result()
