"""Run `fedlora-server` so that it SIGKILLs itself in one window of committing one version.

    python tests/e2e/commit_windows.py WINDOW VERSION [fedlora-server arguments]

A moment inside a commit cannot be picked from the logs, and the coordinator carries no test
hook: this launcher wraps, from outside, the very function that closes the window, then runs
`fedlora_server.cli.main`. Windows, in the order a commit passes them:

- written: the version's temp directory is complete and fsynced, not yet renamed into place;
- renamed: the version is in place, the database does not record it yet;
- recorded: the database committed it, the `adapter` link does not point at it yet;
- linked: the link points at it, the round is not yet booked as committed.

Before dying it logs one JSON event, `killed_in_commit_window`, so a test can tell this kill
from any other end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from fedlora_server import artifacts, cli, versions
from fedlora_server.store import ArtifactRecord, SqliteStore

WINDOWS = ("written", "renamed", "recorded", "linked")


def _die(window: str, version: int) -> NoReturn:
    sys.stderr.write(json.dumps({"event": "killed_in_commit_window", "window": window, "version": version}) + "\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL returned")


class _RenameThatDies:
    """artifacts.py's `os`: every name as in `os`, but `replace` dies around renaming the version into place."""

    def __init__(self, window: str, version: int) -> None:
        self._window = window
        self._version = version

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        into_place = Path(dst).name == f"v{self._version:06d}"
        if into_place and self._window == "written":
            _die(self._window, self._version)
        os.replace(src, dst)
        if into_place and self._window == "renamed":
            _die(self._window, self._version)


def arm(window: str, version: int) -> None:
    """Make this process die in `window` of committing `version`."""
    if window in ("written", "renamed"):
        artifacts.os = _RenameThatDies(window, version)  # type: ignore[attr-defined,assignment]
    elif window == "recorded":
        record = SqliteStore.commit_artifact

        def commit_artifact(self: SqliteStore, artifact: ArtifactRecord) -> None:
            record(self, artifact)
            if artifact.version == version:
                _die(window, version)

        SqliteStore.commit_artifact = commit_artifact  # type: ignore[method-assign]
    elif window == "linked":

        def point_latest(link: Path, target: Path) -> None:
            artifacts.point_latest(link, target)
            if target.name == f"v{version:06d}":
                _die(window, version)

        versions.point_latest = point_latest  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")


def main() -> int:
    window, version, *argv = sys.argv[1:]
    arm(window, int(version))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
