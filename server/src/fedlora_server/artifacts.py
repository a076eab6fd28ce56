"""Committed global models on disk: written whole or not at all, and readable by stock tools.

A LoRA version is a peft adapter directory (`adapter_config.json`, `adapter_model.safetensors`)
that loads with `PeftModel.from_pretrained`; a full fine-tuning version is a model directory
(`config.json`, `model.safetensors`). Each also carries `fedlora.json`: version, manifest, digest.

Writing a version is idempotent: a crash between writing one and recording it leaves it on disk,
and the retried commit adopts it when it is the same model, or moves it aside (never deletes it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedlora_common.chunking import as_bytes, sha256
from fedlora_common.manifest import Manifest, TensorSpec, flatten, unflatten

__all__ = ["CommittedArtifact", "load_artifact", "point_latest", "write_artifact"]

META_FILE = "fedlora.json"


@dataclass(frozen=True)
class CommittedArtifact:
    version: int
    path: Path
    sha256: bytes
    size_bytes: int
    adopted: bool = False
    """The version was already on disk, whole and the same: a crash came between writing and recording it."""
    set_aside: Path | None = None
    """Where a different model found at this version's name was moved (kept, never deleted)."""


def _names(mode: str) -> tuple[str, str]:
    if mode == "full":
        return "config.json", "model.safetensors"
    return "adapter_config.json", "adapter_model.safetensors"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_artifact(
    root: Path,
    version: int,
    *,
    mode: str,
    manifest: Manifest,
    vector: npt.NDArray[np.float32],
    config_json: str,
) -> CommittedArtifact:
    """Write version `version` under root/vNNNNNN: temp dir, fsync, checksum, rename.

    One already there (what a crash before its recording leaves) is adopted when it holds this
    very model, else moved aside to `.vNNNNNN.set-aside-K` and this one written in its place.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version:06d}"
    digest = sha256(as_bytes(vector))
    set_aside = None
    if final.exists():
        if _holds(final, manifest, digest, config_json):
            _fsync_file(root)
            return CommittedArtifact(version, final, digest, vector.nbytes, adopted=True)
        set_aside = _set_aside(final)
    for stale in root.glob(f".{final.name}.tmp-*"):  # a crash's half-written attempt at this version
        shutil.rmtree(stale)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    config_name, weights_name = _names(mode)
    (tmp / config_name).write_text(config_json, encoding="utf-8")
    save_file(
        {name: np.ascontiguousarray(a) for name, a in unflatten(manifest, vector).items()},
        str(tmp / weights_name),
        metadata={"format": "pt"},
    )
    meta = {
        "version": version,
        "mode": mode,
        "sha256": digest.hex(),
        "size_bytes": vector.nbytes,
        "manifest": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in manifest.tensors],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for child in tmp.iterdir():
        _fsync_file(child)
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_file(root)
    return CommittedArtifact(version, final, digest, vector.nbytes, set_aside=set_aside)


def _holds(path: Path, manifest: Manifest, digest: bytes, config_json: str) -> bool:
    """Whether the version at `path` is whole and is this model (layout, values, config)."""
    try:
        found_manifest, vector, found_config = load_artifact(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return False
    return found_manifest == manifest and sha256(as_bytes(vector)) == digest and found_config == config_json


def _set_aside(path: Path) -> Path:
    """Move `path` to the first free `.NAME.set-aside-K` beside it, durably."""
    number = 1
    while (aside := path.with_name(f".{path.name}.set-aside-{number}")).exists():
        number += 1
    os.replace(path, aside)
    _fsync_file(path.parent)
    return aside


def point_latest(link: Path, target: Path) -> None:
    """Atomically make `link` a symlink to `target` (relative, so the tree can be moved)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def load_artifact(path: Path) -> tuple[Manifest, npt.NDArray[np.float32], str]:
    """Read back a committed version (manifest, flat vector, config JSON), checking its digest."""
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    manifest = Manifest(tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in meta["manifest"]))
    config_name, weights_name = _names(meta["mode"])
    vector = flatten(manifest, load_file(str(path / weights_name)))
    if sha256(as_bytes(vector)).hex() != meta["sha256"]:
        raise ValueError(f"artifact {path}: digest does not match its contents")
    return manifest, vector, (path / config_name).read_text(encoding="utf-8")
