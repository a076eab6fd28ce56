"""A stateful strategy's state after each committed version, on disk beside the versions.

`optimizer/vNNNNNN.npz` holds the state the strategy reached when it made version N. It is written
whole (temp file, fsync, rename) before version N is recorded, so every recorded version's state is
on disk; a crash in between leaves one for a version never recorded, which the retried commit
replaces. Version 0 has the fresh state and no file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_server.store import StateError
from fedlora_server.strategy import OptimizerState

__all__ = ["STATE_DIR", "load_state", "save_state", "state_path"]

STATE_DIR = "optimizer"


def state_path(state_dir: Path, version: int) -> Path:
    return state_dir / STATE_DIR / f"v{version:06d}.npz"


def save_state(state_dir: Path, version: int, state: OptimizerState) -> Path:
    """Write the state after `version` durably: a reader finds the whole file or none. OSError if it cannot."""
    path = state_path(state_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a crash's half-written attempt
        stale.unlink()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    arrays: dict[str, Any] = dict(state)  # Any: no name can be told from savez's own keyword
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_state(state_dir: Path, version: int, *, names: tuple[str, ...], numel: int) -> OptimizerState:
    """The state after `version`, each of `names` a float64 array of `numel`; StateError naming the file otherwise."""
    path = state_path(state_dir, version)
    if not path.is_file():
        raise StateError(
            f"{path}: missing; the server optimizer's state after version {version} is needed to resume the run: "
            "restore the state directory from a backup (a run's server optimizer cannot be changed mid-run)"
        )
    try:
        with np.load(path, allow_pickle=False) as stored:
            state = {name: stored[name] for name in names}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise StateError(
            f"{path}: the server optimizer's state after version {version} cannot be read ({exc})"
        ) from None
    for name, array in state.items():
        if array.dtype != np.float64 or array.shape != (numel,):
            raise StateError(
                f"{path}: its {name!r} is {array.dtype} of shape {array.shape}, not float64 of ({numel},) "
                "as the run's update needs"
            )
    return state
