"""What each site installs: the declared requirements, followed through every dependency.

A data holder installs fedlora-common + fedlora-worker: never the coordinator, never plotting.
The coordinating site installs fedlora-common + fedlora-server: never torch. The lab brings both.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"fedlora-common": "common", "fedlora-server": "server", "fedlora-worker": "client", "fedlora-lab": "lab"}


def _requirements(name: str) -> list[Requirement]:
    """A distribution's requirements: ours from their pyproject.toml (the source), others as installed."""
    if name in LOCAL:
        project = tomllib.loads((ROOT / LOCAL[name] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        return [Requirement(r) for r in project.get("dependencies", [])]
    try:
        return [Requirement(r) for r in importlib.metadata.requires(name) or []]
    except importlib.metadata.PackageNotFoundError:
        return []


def closure(name: str) -> set[str]:
    """Every distribution a plain `pip install <name>` brings (no extras), by canonical name."""
    seen: set[str] = {canonicalize_name(name)}
    todo = [name]
    while todo:
        for requirement in _requirements(todo.pop()):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in seen:
                seen.add(dependency)
                todo.append(dependency)
    return seen


def test_a_data_holder_installs_neither_the_coordinator_nor_matplotlib() -> None:
    installed = closure("fedlora-worker")

    assert "fedlora-common" in installed
    assert "torch" in installed
    assert not installed & {"fedlora-server", "fedlora-lab", "matplotlib"}


def test_the_coordinator_installs_no_torch() -> None:
    installed = closure("fedlora-server")

    assert "markdown" in installed
    assert not installed & {"torch", "fedlora-worker", "fedlora-lab"}


def test_the_lab_brings_worker_and_coordinator() -> None:
    installed = closure("fedlora-lab")

    assert {"fedlora-worker", "fedlora-server", "faker", "scipy"} <= installed


def test_ray_comes_only_with_the_labs_ray_extra() -> None:
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    extra = [canonicalize_name(Requirement(r).name) for r in lab["optional-dependencies"]["ray"]]

    assert extra == ["ray"]
    assert not [name for name in LOCAL if "ray" in closure(name)]
