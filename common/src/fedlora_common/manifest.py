"""Ordered tensor layouts, and the flat float32 vectors that travel on the wire.

Both sides agree on one order of named tensors (the manifest); an update is the
concatenation of those tensors in that order. Nothing here knows about torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MASKED_DTYPE",
    "WIRE_DTYPE",
    "Manifest",
    "TensorSpec",
    "adapted_modules",
    "flatten",
    "module_leaves",
    "unflatten",
    "update_manifest",
]

WIRE_DTYPE = "float32"
MASKED_DTYPE = "uint32"
"""Masked updates travel as elements of Z_2^32: four bytes each, like the float32 delta."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = WIRE_DTYPE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("manifest names must be unique")

    @classmethod
    def of(cls, state: Mapping[str, npt.NDArray[np.floating]]) -> Manifest:
        """The manifest of a state dict, in its iteration order."""
        return cls(tuple(TensorSpec(name, tuple(int(d) for d in a.shape)) for name, a in state.items()))

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(WIRE_DTYPE).itemsize

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Element range [start, stop) of each tensor inside the flat vector."""
        out: dict[str, tuple[int, int]] = {}
        start = 0
        for t in self.tensors:
            out[t.name] = (start, start + t.numel)
            start += t.numel
        return out

    def subset(self, names: Iterable[str]) -> Manifest:
        keep = set(names)
        return Manifest(tuple(t for t in self.tensors if t.name in keep))


def adapted_modules(tensor_names: Iterable[str]) -> tuple[str, ...]:
    """The modules an adapter's lora_A/lora_B tensors adapt, in order: one per adapted weight, so a fused
    experts' second parameter (peft's wrapper inside the first: ``experts.base_layer``) is one of its own."""
    return tuple(
        dict.fromkeys(name.rsplit(".lora_", 1)[0] for name in tensor_names if ".lora_A." in name or ".lora_B." in name)
    )


def module_leaves(modules: Iterable[str]) -> tuple[str, ...]:
    """Distinct last names of modules (q_proj, not layers.0.self_attn.q_proj), a wrapper's inner ``base_layer``
    named as the module it wraps (experts)."""
    return tuple(dict.fromkeys(re.sub(r"(\.base_layer)+$", "", module).rsplit(".", 1)[-1] for module in modules))


def update_manifest(manifest: Manifest, aggregation: str) -> Manifest:
    """The tensors a worker's update carries: all of them, or only LoRA B under FFA-LoRA (A stays frozen)."""
    if aggregation == "ffa":
        return manifest.subset(t.name for t in manifest.tensors if ".lora_B." in t.name)
    return manifest


def flatten(manifest: Manifest, state: Mapping[str, npt.NDArray[np.floating]]) -> npt.NDArray[np.float32]:
    """Concatenate the manifest's tensors, in its order, into one float32 vector."""
    out = np.empty(manifest.numel, dtype=np.float32)
    for spec, (start, stop) in zip(manifest.tensors, manifest.offsets().values(), strict=True):
        array = state[spec.name]
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"tensor {spec.name}: shape {tuple(array.shape)} != manifest {spec.shape}")
        out[start:stop] = np.asarray(array, dtype=np.float32).reshape(-1)
    return out


def unflatten(manifest: Manifest, vector: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
    """Views into a flat vector, one per tensor, shaped as the manifest says."""
    if vector.size != manifest.numel:
        raise ValueError(f"vector has {vector.size} elements, manifest {manifest.numel}")
    return {
        spec.name: vector[start:stop].reshape(spec.shape)
        for spec, (start, stop) in zip(manifest.tensors, manifest.offsets().values(), strict=True)
    }
