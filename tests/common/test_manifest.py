import numpy as np
import pytest

from fedlora_common.manifest import (
    Manifest,
    TensorSpec,
    adapted_modules,
    flatten,
    module_leaves,
    unflatten,
    update_manifest,
)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
        "layers.0.q_proj.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32),
        "layers.0.v_proj.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
        "layers.0.v_proj.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32),
    }


def test_flatten_then_unflatten_returns_every_tensor() -> None:
    state = _state(0)
    manifest = Manifest.of(state)

    restored = unflatten(manifest, flatten(manifest, state))

    assert list(restored) == list(state)
    for name, value in state.items():
        np.testing.assert_array_equal(restored[name], value)
    assert manifest.nbytes == sum(a.nbytes for a in state.values())


def test_flatten_refuses_a_tensor_of_the_wrong_shape() -> None:
    state = _state(1)
    manifest = Manifest.of(state)
    state["layers.0.v_proj.lora_B.weight"] = np.zeros((4, 8), dtype=np.float32)

    with pytest.raises(ValueError, match=r"v_proj\.lora_B"):
        flatten(manifest, state)


def test_ffa_updates_carry_only_lora_b() -> None:
    manifest = Manifest.of(_state(2))

    sent = update_manifest(manifest, "ffa")

    assert sent.names == ("layers.0.q_proj.lora_B.weight", "layers.0.v_proj.lora_B.weight")
    assert update_manifest(manifest, "fedavg") == manifest


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        Manifest((TensorSpec("a", (1,)), TensorSpec("a", (2,))))


def test_adapted_modules_are_one_per_adapted_weight_and_named_by_the_module_they_adapt() -> None:
    layer = "base_model.model.model.layers.0"
    names = [
        f"{layer}.self_attn.q_proj.lora_A.weight",
        f"{layer}.self_attn.q_proj.lora_B.weight",
        f"{layer}.mlp.experts.lora_A.weight",  # a fused experts' two parameters: two wrappers, one module
        f"{layer}.mlp.experts.lora_B.weight",
        f"{layer}.mlp.experts.base_layer.lora_A.weight",
        f"{layer}.mlp.experts.base_layer.lora_B.weight",
        f"{layer}.mlp.gate.weight",  # a full fine-tuning tensor: no adapter
    ]

    modules = adapted_modules(names)

    assert modules == (f"{layer}.self_attn.q_proj", f"{layer}.mlp.experts", f"{layer}.mlp.experts.base_layer")
    assert module_leaves(modules) == ("q_proj", "experts")
