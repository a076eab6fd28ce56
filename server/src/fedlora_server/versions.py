"""The committed global models: artifacts on disk, their records in the store, the current one in memory.

A version is written whole (temp dir, fsync, checksum, rename) and recorded in the store before
any worker can see it; `state_dir/adapter` then points at it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError

from fedlora_common.aggregation import apply_update
from fedlora_common.chunking import as_bytes, sha256
from fedlora_common.manifest import Manifest, update_manifest
from fedlora_common.messages import ModelVersion
from fedlora_common.plans import Aggregation, Mode
from fedlora_server.artifacts import load_artifact, point_latest, write_artifact
from fedlora_server.errors import InvalidArgument
from fedlora_server.store import ArtifactRecord, CoordinatorStore, StateError

__all__ = ["GlobalModel", "Versions", "check_artifact_config"]


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
    ) -> None:
        self._state_dir = state_dir
        self._artifacts_dir = state_dir / "artifacts"
        self._latest_link = state_dir / "adapter"
        self._mode = mode
        self._aggregation = aggregation
        self._store = store
        self._clock = clock
        self.current: GlobalModel | None = None

    def restore(self) -> GlobalModel | None:
        """Load the latest committed version: its artifact must be where the store says, whole, with its digest."""
        latest = self._store.latest_artifact()
        if latest is None:
            return None
        path = self._resolve(latest.path)
        try:
            manifest, vector, config_json = load_artifact(path)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise StateError(f"{path}: version {latest.version} cannot be read ({exc})") from None
        if as_sha256(vector) != latest.sha256:
            raise StateError(f"{path}: version {latest.version} does not match the digest the store recorded")
        version = ModelVersion(latest.version, latest.size_bytes, bytes.fromhex(latest.sha256), manifest)
        self.current = GlobalModel(version, vector, config_json, latest.round)
        return self.current

    def stray_artifacts(self) -> list[Path]:
        """Committed versions on disk; a store that records none of them belongs to another run or was lost."""
        if not self._artifacts_dir.is_dir():
            return []
        return sorted(p for p in self._artifacts_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _resolve(self, stored: str) -> Path:
        """Artifact paths are stored relative to state_dir, so a state directory can be moved whole."""
        path = Path(stored)
        return self._artifacts_dir / path.name if path.is_absolute() else self._state_dir / path

    def update_manifest(self, current: GlobalModel) -> Manifest:
        """What an update carries: every tensor of the global state, or the B matrices only (FFA-LoRA)."""
        return update_manifest(current.version.manifest, self._aggregation)

    def commit_initial(self, vector: npt.NDArray[np.float32], config_json: str, manifest: Manifest) -> GlobalModel:
        check_artifact_config(config_json)
        return self._commit(vector, config_json, 0, manifest)

    def commit_update(self, current: GlobalModel, mean_delta: npt.NDArray[np.float32], round_: int) -> GlobalModel:
        """Apply the round's mean update to `current` and commit the result as the next version."""
        manifest = current.version.manifest
        vector = apply_update(current.vector, manifest, self.update_manifest(current), mean_delta)
        return self._commit(vector, current.config_json, round_, manifest)

    def _commit(
        self, vector: npt.NDArray[np.float32], config_json: str, round_: int, manifest: Manifest
    ) -> GlobalModel:
        number = 0 if self.current is None else self.current.number + 1
        artifact = write_artifact(
            self._artifacts_dir, number, mode=self._mode, manifest=manifest, vector=vector, config_json=config_json
        )
        stored = str(artifact.path.relative_to(self._state_dir))
        self._store.commit_artifact(
            ArtifactRecord(number, round_, artifact.sha256.hex(), artifact.size_bytes, stored, self._clock())
        )
        if round_ >= 1:  # the initial version holds no training: never mistake it for a result
            point_latest(self._latest_link, artifact.path)
        version = ModelVersion(number, artifact.size_bytes, artifact.sha256, manifest)
        self.current = GlobalModel(version, vector, config_json, round_)
        return self.current
