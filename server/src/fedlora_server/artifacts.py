"""Committed global models on disk: written whole or not at all, and readable by stock tools.

A LoRA version is a peft adapter directory (`adapter_config.json`, `adapter_model.safetensors`)
that loads with `PeftModel.from_pretrained`; a full fine-tuning version is a model directory
(`config.json`, `model.safetensors`). Each also carries `fedlora.json`: version, manifest, digest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
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
    """Write version `version` under root/vNNNNNN: temp dir, fsync, checksum, rename."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version:06d}"
    if final.exists():
        raise FileExistsError(f"artifact version {version} already exists at {final}")
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config_name, weights_name = _names(mode)
    digest = sha256(as_bytes(vector))
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
    return CommittedArtifact(version, final, digest, vector.nbytes)


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
