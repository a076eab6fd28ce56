"""The worker program's exit status is main's, whatever the interpreter's teardown does after it."""

from __future__ import annotations

import subprocess
import sys

import pytest

# An atexit hook that aborts the process stands for a native library's thread destroyed while joinable at
# teardown (pyarrow's: "terminate called without an active exception"); it runs only if teardown does.
_PROGRAM = """
import atexit, os, signal, sys
atexit.register(lambda: os.kill(os.getpid(), signal.SIGABRT))
sys.argv = ["fedlora-worker", *{args!r}]
from fedlora_worker.cli import entry
entry()
"""


@pytest.mark.parametrize(
    ("args", "status"),
    [(["--help"], 0), (["--config", "/nonexistent/worker.yaml"], 2)],
    ids=["help-exits-0", "config-error-exits-2"],
)
def test_an_abort_in_the_interpreters_teardown_does_not_change_the_workers_exit_status(
    args: list[str], status: int
) -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM.format(args=args)], capture_output=True, text=True, timeout=120
    )

    # Assert: main's status and its whole output; the abort hook never ran.
    assert result.returncode == status, result.stderr
    if status == 0:
        assert result.stdout.startswith("usage")
    else:
        assert result.stderr.startswith("fedlora-worker: config error: "), result.stderr
        assert result.stderr.count("\n") == 1


def test_the_worker_program_and_module_end_through_entry() -> None:
    # Execute: `python -m fedlora_worker` as the tests and images run it.
    result = subprocess.run(
        [sys.executable, "-m", "fedlora_worker", "--config", "/nonexistent/worker.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 2
    assert result.stderr.startswith("fedlora-worker: config error: ")
