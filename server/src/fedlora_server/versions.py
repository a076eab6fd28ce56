"""The committed global models: artifacts on disk, their records in the store, the current one in memory.

A version is written whole (temp dir, fsync, checksum, rename) and recorded in the store before
any worker can see it; `state_dir/adapter` then points at it. A resumed run checks every version
the store records: the latest must be whole (it is all a run needs), an older one missing or
damaged is reported, and a stale `adapter` link is re-pointed.

The run's `Strategy` makes each next version of the round's mean update; a stateful one's state
after a version is written before that version is recorded, and read back with it on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
from safetensors import SafetensorError

from fedlora_common.chunking import as_bytes, sha256
from fedlora_common.manifest import Manifest, update_manifest
from fedlora_common.messages import ModelVersion
from fedlora_common.plans import Aggregation, Mode
from fedlora_server.artifacts import META_FILE, load_artifact, point_latest, write_artifact
from fedlora_server.errors import InvalidArgument
from fedlora_server.store import ArtifactRecord, CoordinatorStore, StateError
from fedlora_server.strategy import FedAvg, OptimizerState, Strategy
from fedlora_server.strategy_state import load_state, save_state

__all__ = [
    "GlobalModel",
    "Versions",
    "artifact_path",
    "check_artifact_config",
    "reference_fault",
    "verified_artifact",
    "versions_on_disk",
]

ARTIFACTS_DIR = "artifacts"
ADAPTER_LINK = "adapter"
log = structlog.get_logger()


@dataclass(frozen=True)
class GlobalModel:
    """A committed version, held in memory to stream to workers."""

    version: ModelVersion
    vector: npt.NDArray[np.float32]
    config_json: str
    round: int

    @property
    def number(self) -> int:
        return self.version.version


def as_sha256(vector: npt.NDArray[np.float32]) -> str:
    return sha256(as_bytes(vector)).hex()


def check_artifact_config(config_json: str) -> None:
    """The config saved beside the weights (peft's adapter_config.json or a model's config.json)."""
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError:
        raise InvalidArgument("artifact_config_json is not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidArgument("artifact_config_json must be a JSON object")


def artifact_path(state_dir: Path, stored: str) -> Path:
    """Artifact paths are stored relative to state_dir, so a state directory can be moved whole."""
    path = Path(stored)
    return state_dir / ARTIFACTS_DIR / path.name if path.is_absolute() else state_dir / path


def versions_on_disk(state_dir: Path) -> list[Path]:
    """The version directories under state_dir/artifacts (names starting with '.' are temporary or set aside)."""
    root = state_dir / ARTIFACTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def verified_artifact(state_dir: Path, record: ArtifactRecord) -> tuple[Manifest, npt.NDArray[np.float32], str]:
    """A recorded version read back whole, with the digest the store recorded; StateError otherwise."""
    path = artifact_path(state_dir, record.path)
    try:
        manifest, vector, config_json = load_artifact(path)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise StateError(f"{path}: version {record.version} cannot be read ({exc})") from None
    if as_sha256(vector) != record.sha256:
        raise StateError(f"{path}: version {record.version} does not match the digest the store recorded")
    return manifest, vector, config_json


def reference_fault(state_dir: Path, record: ArtifactRecord) -> str | None:
    """What is wrong with a recorded version, judged by its fedlora.json alone (cheap); None if nothing."""
    path = artifact_path(state_dir, record.path)
    if not path.is_dir():
        return "missing"
    try:
        digest = json.loads((path / META_FILE).read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({exc})"
    return None if digest == record.sha256 else "its digest differs from the one the store recorded"


class Versions:
    """The run's global model versions; `current` is None until the initial model is committed."""

    def __init__(
        self,
        *,
        state_dir: Path,
        mode: Mode,
        aggregation: Aggregation,
        store: CoordinatorStore,
        clock: Callable[[], float],
        strategy: Strategy | None = None,
    ) -> None:
        """`strategy`: how the round's mean update becomes the next version; None: FedAvg (global += mean)."""
        self._state_dir = state_dir
        self._artifacts_dir = state_dir / ARTIFACTS_DIR
        self._latest_link = state_dir / ADAPTER_LINK
        self._mode = mode
        self._aggregation = aggregation
        self._store = store
        self._clock = clock
        self._strategy = FedAvg(weighting="examples") if strategy is None else strategy
        self._strategy_state: OptimizerState = {}
        self.current: GlobalModel | None = None

    def restore(self) -> GlobalModel | None:
        """Load the latest committed version (StateError unless whole, with its recorded digest), report
        older versions missing or damaged, and re-point a stale `adapter` link."""
        records = self._store.artifacts()
        latest = records[-1] if records else None
        restored = None
        if latest is not None:
            manifest, vector, config_json = verified_artifact(self._state_dir, latest)
            version = ModelVersion(latest.version, latest.size_bytes, bytes.fromhex(latest.sha256), manifest)
            restored = GlobalModel(version, vector, config_json, latest.round)
            self._strategy_state = self._state_of(restored)
        for record in records[:-1]:
            if (fault := reference_fault(self._state_dir, record)) is not None:
                path = str(artifact_path(self._state_dir, record.path))
                log.warning("artifact_damaged", version=record.version, path=path, fault=fault)
        self._repair_link(latest)
        self.current = restored
        return restored

    def _state_of(self, model: GlobalModel) -> OptimizerState:
        """The strategy's state after `model`: fresh at version 0, else as committed (StateError if missing)."""
        numel = self.update_manifest(model).numel
        if model.number == 0 or not self._strategy.stateful:
            return self._strategy.fresh_state(numel)
        return load_state(self._state_dir, model.number, names=self._strategy.state_names, numel=numel)

    def _repair_link(self, latest: ArtifactRecord | None) -> None:
        """`adapter` points at the latest committed round >= 1, or is absent; anything but a link is left alone."""
        link = self._latest_link
        target = artifact_path(self._state_dir, latest.path) if latest is not None and latest.round >= 1 else None
        if link.exists() and not link.is_symlink():
            log.warning("adapter_not_a_link", path=str(link), reason="left alone; it is not the coordinator's")
            return
        was = os.readlink(link) if link.is_symlink() else None
        if target is None:
            if was is not None:
                link.unlink()
                log.warning("adapter_link_repaired", was=was, now=None)
            return
        if was is not None and link.resolve() == target.resolve():
            return
        point_latest(link, target)
        log.warning("adapter_link_repaired", was=was, now=os.readlink(link))

    def stray_artifacts(self) -> list[Path]:
        """Committed versions on disk; a store that records none of them belongs to another run or was lost."""
        return versions_on_disk(self._state_dir)

    def update_manifest(self, current: GlobalModel) -> Manifest:
        """What an update carries: every tensor of the global state, or the B matrices only (FFA-LoRA)."""
        return update_manifest(current.version.manifest, self._aggregation)

    def commit_initial(self, vector: npt.NDArray[np.float32], config_json: str, manifest: Manifest) -> GlobalModel:
        check_artifact_config(config_json)
        model = self._commit(vector, config_json, 0, manifest)
        self._strategy_state = self._strategy.fresh_state(self.update_manifest(model).numel)
        return model

    def commit_update(
        self, current: GlobalModel, mean_delta: npt.NDArray[np.float32], round_: int, *, contributors: int
    ) -> GlobalModel:
        """Make the next version of `current` and the round's mean update of `contributors` updates, by the
        strategy, and commit it with the strategy's state (written first, so a recorded version has its state)."""
        manifest = current.version.manifest
        vector, state = self._strategy.next_state(
            current.vector,
            manifest,
            self.update_manifest(current),
            mean_delta,
            self._strategy_state,
            contributors=contributors,
        )
        if self._strategy.stateful:
            save_state(self._state_dir, self._next_number(), state)
        model = self._commit(vector, current.config_json, round_, manifest)
        self._strategy_state = state
        return model

    def _next_number(self) -> int:
        return 0 if self.current is None else self.current.number + 1

    def _commit(
        self, vector: npt.NDArray[np.float32], config_json: str, round_: int, manifest: Manifest
    ) -> GlobalModel:
        """Write, record, publish. OSError or errors.Unavailable before the record: nothing is committed."""
        number = self._next_number()
        artifact = write_artifact(
            self._artifacts_dir, number, mode=self._mode, manifest=manifest, vector=vector, config_json=config_json
        )
        if artifact.adopted:
            log.info("artifact_adopted", version=number, reason="written before a crash, never recorded")
        if artifact.set_aside is not None:
            log.warning("artifact_set_aside", version=number, path=str(artifact.set_aside))
        stored = str(artifact.path.relative_to(self._state_dir))
        self._store.commit_artifact(
            ArtifactRecord(number, round_, artifact.sha256.hex(), artifact.size_bytes, stored, self._clock())
        )
        version = ModelVersion(number, artifact.size_bytes, artifact.sha256, manifest)
        self.current = GlobalModel(version, vector, config_json, round_)
        if round_ >= 1:  # the initial version holds no training: never mistake it for a result
            try:
                point_latest(self._latest_link, artifact.path)
            except OSError as exc:  # the version stands; the link is re-pointed at the next commit or start
                log.error("adapter_link_failed", version=number, reason=str(exc))
        return self.current
