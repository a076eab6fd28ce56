"""Where an experiment's cells run: threads of this process (``local``) or tasks on Ray (``ray``).

A cell is the argument of one function; an executor calls the function on every cell of a list,
at most ``parallel`` at a time, and yields each cell with its result as soon as it is done, so the
caller stores every result the moment it exists. The grid of (method, seed) runs is one such list;
any other stage of an experiment hands its own cells to the same executor.

Ray is an optional extra (``pip install 'fedlora-lab[ray]'``), imported only when a Ray executor
starts. A local Ray is started here with ``parallel`` CPUs and stopped at the end, its tasks at this
program's priority (Ray's own default, nice 15, starves them beside any other work on the machine); a
cluster named by its address is only connected to, and left running. A cell's work is done on whichever node runs it:
its function's arguments (the base model's path, the output directory) must mean the same there.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import islice
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

if TYPE_CHECKING:
    from ray import ObjectRef

__all__ = [
    "RAY_MISSING",
    "CellExecutor",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "open_executor",
    "ray_installed",
]

Executor = Literal["local", "ray"]
RAY_MISSING: Final = "ray is not installed: pip install 'fedlora-lab[ray]'"

Cell = TypeVar("Cell")
Result = TypeVar("Result")


def ray_installed() -> bool:
    """Whether ray can be imported, without importing it (importing ray reconfigures logging)."""
    return importlib.util.find_spec("ray") is not None


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


def _call(fn: Callable[[Any], Any], cell: Any) -> Any:
    """The Ray task every cell runs as: ``fn`` is shipped once (ray.put) and shared by every task."""
    return fn(cell)


class RayExecutor(CellExecutor):
    """Each cell a Ray task that reserves one CPU, at most ``parallel`` of them submitted at a time.

    With no ``address`` the first non-empty list starts a Ray in this process with ``parallel`` CPUs (no
    dashboard) and ``shutdown`` stops it; with an address (``auto``, ``ray://head:10001``) it connects to
    that cluster and ``shutdown`` only disconnects. Workers' output stays in Ray's session logs
    (``log_to_driver`` off), and Ray's own log records go through this program's logging.
    """

    def __init__(self, *, parallel: int, address: str | None = None) -> None:
        self._parallel = parallel
        self._address = address
        self._started = False

    def _start(self) -> None:
        import ray

        _ray_logs_through_this_program()
        if self._address is None:
            ray.init(
                num_cpus=self._parallel,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                _system_config={"worker_niceness": 0},  # what Ray adds to the niceness its workers inherit
            )
        else:
            ray.init(address=self._address, log_to_driver=False, configure_logging=False)
        self._started = True

    def run(self, fn: Callable[[Cell], Result], cells: Sequence[Cell]) -> Iterator[tuple[Cell, Result]]:
        if not cells:
            return
        if not self._started:
            self._start()
        import ray

        task = ray.remote(num_cpus=1)(_call)
        shared_fn = ray.put(fn)
        waiting = iter(cells)
        pending: dict[ObjectRef[Any], Cell] = {}

        def submit(count: int) -> None:
            for cell in islice(waiting, count):
                pending[task.remote(shared_fn, cell)] = cell

        submit(self._parallel)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                submit(1)
                yield cell, ray.get(done[0])
        finally:
            for ref in pending:  # only when a cell raised or the caller stopped early
                ray.cancel(ref)

    def shutdown(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _ray_logs_through_this_program() -> None:
    """``import ray`` gives the ``ray`` logger a handler that prints plain lines and stops propagation; hand its
    records to the program's logging instead (``configure_logging``'s handler and level), as any library's."""
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    ray_logger.setLevel(logging.NOTSET)


def open_executor(executor: Executor, *, parallel: int, ray_address: str | None = None) -> CellExecutor:
    """The executor a config names; use it as a context manager so that Ray, if started, is stopped."""
    if executor == "ray":
        return RayExecutor(parallel=parallel, address=ray_address)
    return LocalExecutor(parallel=parallel)
