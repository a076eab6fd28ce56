from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from bitsandbytes.nn.modules import Linear4bit
from peft import LoraConfig, PeftModel
from pydantic import ValidationError
from safetensors.numpy import save_file
from structlog.testing import capture_logs
from transformers import AutoModelForCausalLM

from fedlora_common.plans import Aggregation, LoraSpec, Mode, RunSpec
from fedlora_worker.modeling import (
    LoadedModel,
    SiteMismatch,
    SiteModel,
    artifact_config_json,
    global_state,
    linear_layers,
    lora_config,
    set_global_state,
)

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
Load = Callable[..., LoadedModel]

LORA = LoraSpec(rank=4, alpha=8, dropout=0.0)  # default targets: all-linear
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama block: what all-linear resolves to on the tiny model."""
TARGETS = "|".join(PROJECTIONS)
ADAPTER_NAME = re.compile(rf"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.({TARGETS})\.lora_[AB]\.weight$")
LAYERS = 2
SAMPLE = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 100, 200, 300, 400, 500, 2, 7]])


@pytest.fixture
def load(load_tiny: Load) -> Load:
    return partial(load_tiny, lora=LORA)


def random_state(loaded: LoadedModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.normal(0.0, 0.05, t.shape).astype(np.float32) for t in loaded.manifest.tensors}


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=input_ids).logits
    return out


def test_qlora_base_projections_are_bitsandbytes_4bit_layers(load: Load) -> None:
    loaded = load("qlora")

    projections = {
        name: module.base_layer for name, module in loaded.model.named_modules() if name.split(".")[-1] in PROJECTIONS
    }

    assert len(projections) == LAYERS * len(PROJECTIONS)
    assert all(isinstance(layer, Linear4bit) for layer in projections.values())
    assert {layer.weight.quant_type for layer in projections.values()} == {"nf4"}


def test_qlora_evaluates_in_the_runs_compute_dtype_on_any_cpu_without_repacking_its_weights(load: Load) -> None:
    # Prepare: on a CPU with AVX512-BF16, bitsandbytes' inference path would repack each 4-bit weight in place,
    # compute in bfloat16, and assert on layers narrower or wider than a multiple of 32.
    loaded = load("qlora")
    layers = [m for m in loaded.model.modules() if isinstance(m, Linear4bit)]
    before = [layer.weight.data.clone() for layer in layers]
    input_ids = torch.arange(1, 9).unsqueeze(0)

    # Execute: an evaluation forward, as the worker runs it.
    loaded.model.eval()
    with torch.inference_mode():
        logits = loaded.model(input_ids=input_ids).logits

    # Assert: float32 logits (the run's compute dtype), weights untouched, on this CPU whatever it supports.
    assert logits.dtype == torch.float32
    assert all(torch.equal(layer.weight.data, old) for layer, old in zip(layers, before, strict=True))
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_lora_config_carries_every_lora_setting_to_peft() -> None:
    spec = LoraSpec(rank=8, alpha=3, dropout=0.25, target_modules=("q_proj", "down_proj"))

    config = lora_config(spec)

    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 3, 0.25)
    assert config.target_modules == {"q_proj", "down_proj"}
    assert config.task_type == "CAUSAL_LM"


def test_bfloat16_qlora_computes_in_bfloat16_with_a_float32_adapter(load: Load) -> None:
    loaded = load("qlora", dtype="bfloat16")

    q_proj = loaded.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer")

    assert q_proj.compute_dtype == torch.bfloat16
    assert all(array.dtype == np.float32 for array in global_state(loaded).values())


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapter_manifest_holds_only_lora_a_and_b_of_every_target_module(load: Load, mode: Mode) -> None:
    loaded = load(mode)

    tensors = loaded.manifest.tensors

    assert len(tensors) == LAYERS * len(PROJECTIONS) * 2
    assert all(ADAPTER_NAME.match(t.name) for t in tensors)
    assert all(t.shape[0] == LORA.rank for t in tensors if ".lora_A." in t.name)
    assert all(t.shape[1] == LORA.rank for t in tensors if ".lora_B." in t.name)


def test_full_manifest_covers_every_parameter_once(load: Load) -> None:
    loaded = load("full")

    unique = {id(p): p for p in loaded.model.parameters()}

    assert loaded.manifest.names == tuple(name for name, _ in loaded.model.named_parameters())
    assert "lm_head.weight" not in loaded.manifest.names  # tied to the embedding, shipped once
    assert loaded.manifest.numel == sum(p.numel() for p in unique.values())
    assert all(p.requires_grad for p in unique.values())


def test_ffa_freezes_every_lora_a_and_trains_every_lora_b(load: Load) -> None:
    loaded = load("lora", aggregation="ffa")

    trainable = {name for name, p in loaded.model.named_parameters() if p.requires_grad}

    assert trainable
    assert all(".lora_B." in name for name in trainable)
    assert len(trainable) == LAYERS * len(PROJECTIONS)


def test_full_with_ffa_is_rejected(make_run: Callable[..., RunSpec]) -> None:
    with pytest.raises(ValueError, match="ffa"):
        make_run("full", lora=LORA, aggregation="ffa")


@pytest.mark.parametrize(("field", "value"), [("mode", "dora"), ("aggregation", "fedprox")])
def test_unknown_run_choices_are_rejected_naming_the_field(
    make_run: Callable[..., RunSpec], field: str, value: str
) -> None:
    fields = make_run("lora", lora=LORA).model_dump()

    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n"):
        RunSpec.model_validate({**fields, field: value})


def test_an_unknown_site_dtype_is_rejected_naming_the_field(tiny_base_model: Path) -> None:
    with pytest.raises(ValidationError, match=r"(?m)^dtype\n"):
        SiteModel.model_validate({"path": str(tiny_base_model), "dtype": "float16"})


def test_same_seed_builds_the_same_initial_adapter_and_another_seed_another_a(load: Load) -> None:
    first = global_state(load("lora", seed=7))
    again = global_state(load("lora", seed=7))
    other = global_state(load("lora", seed=8))

    assert all(np.array_equal(first[name], again[name]) for name in first)
    a_names = [name for name in first if ".lora_A." in name]
    assert all(not np.array_equal(first[name], other[name]) for name in a_names)
    assert all(not first[name].any() for name in first if ".lora_B." in name)  # B starts at zero


def test_loading_leaves_the_callers_random_state_alone(load: Load) -> None:
    before = torch.random.get_rng_state()

    load("lora", seed=3)

    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_global_state_round_trips_through_set_global_state(load: Load, mode: Mode) -> None:
    loaded = load(mode)
    state = random_state(loaded, seed=1)

    set_global_state(loaded, state)
    read = global_state(loaded)

    assert list(read) == list(loaded.manifest.names)
    assert all(np.array_equal(read[name], state[name]) for name in state)


def test_global_state_is_a_copy_the_model_does_not_share(load: Load) -> None:
    loaded = load("full")
    state = global_state(loaded)
    name = loaded.manifest.names[0]

    state[name][...] = 123.0

    assert not (global_state(loaded)[name] == 123.0).any()


def test_set_global_state_names_a_tensor_of_the_wrong_shape(load: Load) -> None:
    loaded = load("lora")
    state = global_state(loaded)
    name = loaded.manifest.names[3]
    state[name] = np.zeros((1, 1), dtype=np.float32)

    with pytest.raises(ValueError, match=re.escape(name)):
        set_global_state(loaded, state)


def test_set_global_state_names_a_missing_or_unknown_tensor(load: Load) -> None:
    loaded = load("lora")
    missing = global_state(loaded)
    gone = loaded.manifest.names[-1]
    del missing[gone]
    unknown = {**global_state(loaded), "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}

    with pytest.raises(ValueError, match=re.escape(gone)):
        set_global_state(loaded, missing)
    with pytest.raises(ValueError, match="lm_head"):
        set_global_state(loaded, unknown)


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_coordinator_written_adapter_loads_with_stock_peft(
    tiny_base_model: Path, load: Load, tmp_path: Path, aggregation: Aggregation
) -> None:
    loaded = load("lora", aggregation=aggregation)
    state = random_state(loaded, seed=2)
    set_global_state(loaded, state)
    (tmp_path / "adapter_config.json").write_text(artifact_config_json(loaded))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_model), tmp_path)

    assert json.loads(artifact_config_json(loaded))["base_model_name_or_path"] == str(tiny_base_model)
    torch.testing.assert_close(logits(stock, SAMPLE), logits(loaded.model, SAMPLE))
    plain = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    assert not torch.allclose(logits(stock, SAMPLE), logits(plain, SAMPLE))


def test_adapter_config_json_matches_what_peft_itself_writes(load: Load, tmp_path: Path) -> None:
    loaded = load("lora")

    cast(PeftModel, loaded.model).save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = json.loads(artifact_config_json(loaded))

    assert sorted(written.pop("target_modules")) == ours.pop("target_modules") == sorted(loaded.adapted_modules)
    assert ours == written


def test_coordinator_written_full_model_loads_with_from_pretrained(load: Load, tmp_path: Path) -> None:
    loaded = load("full")
    state = random_state(loaded, seed=3)
    set_global_state(loaded, state)
    (tmp_path / "config.json").write_text(artifact_config_json(loaded))
    save_file(state, str(tmp_path / "model.safetensors"))

    stock = AutoModelForCausalLM.from_pretrained(tmp_path)

    torch.testing.assert_close(logits(stock, SAMPLE), logits(loaded.model, SAMPLE))


def test_default_targets_adapt_every_linear_layer_of_the_blocks_but_not_the_output_head(load: Load) -> None:
    loaded = load("lora")

    adapted = loaded.adapted_modules

    assert LORA.target_modules == ("all-linear",)
    assert len(adapted) == LAYERS * len(PROJECTIONS)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(PROJECTIONS)
    assert all(name.startswith("model.layers.") for name in adapted)  # lm_head and embeddings stay frozen


def test_all_linear_reaches_peft_as_its_shorthand_not_as_a_module_name() -> None:
    assert lora_config(LoraSpec()).target_modules == "all-linear"


def test_linear_layers_leave_out_the_output_head(tiny_base_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model, tie_word_embeddings=False)

    found = linear_layers(model)

    assert "lm_head" not in found
    assert len(found) == LAYERS * len(PROJECTIONS)


def test_targets_named_by_the_run_adapt_only_those_modules(load_tiny: Load) -> None:
    loaded = load_tiny("lora", lora=LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))

    assert sorted({name.rsplit(".", 1)[-1] for name in loaded.adapted_modules}) == ["q_proj", "v_proj"]
    assert len(loaded.manifest.tensors) == LAYERS * 2 * 2


@pytest.mark.parametrize(
    ("targets", "unmatched"),
    [
        (("c_attn", "c_fc"), "c_attn, c_fc"),  # GPT-2's names on a Llama: nothing matches
        (("q_proj", "qkv_proj", "gate_up_proj"), "qkv_proj, gate_up_proj"),  # Phi-3's fused names: only part
    ],
)
def test_targets_that_match_nothing_or_only_part_are_refused_naming_the_modules_found(
    load_tiny: Load, targets: tuple[str, ...], unmatched: str
) -> None:
    spec = LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=targets)

    with pytest.raises(SiteMismatch) as refused:
        load_tiny("lora", lora=spec)

    message = str(refused.value)
    assert message.startswith(f"lora.target_modules: {unmatched} match no module of ")
    assert "its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    assert "\n" not in message


def test_a_target_that_is_no_layer_peft_can_adapt_is_refused_in_one_line(load_tiny: Load) -> None:
    spec = LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=("mlp",))

    with pytest.raises(SiteMismatch, match=r"^lora\.target_modules: .*its linear layers are q_proj") as refused:
        load_tiny("lora", lora=spec)

    assert "\n" not in str(refused.value)


def test_loading_logs_the_adapted_modules_and_the_trainable_fraction(load: Load) -> None:
    with capture_logs() as logs:
        loaded = load("lora")

    (event,) = [e for e in logs if e["event"] == "model_loaded"]
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in loaded.model.parameters())
    assert event["adapted_modules"] == list(PROJECTIONS)
    assert event["adapted_count"] == LAYERS * len(PROJECTIONS)
    assert event["trainable_parameters"] == trainable
    assert event["trainable_fraction"] == pytest.approx(trainable / total, abs=1e-6)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["all-linear", "q_proj"], "all-linear already adapts every linear layer"),
        ([" "], "module names must not be empty"),
    ],
)
def test_target_lists_that_cannot_mean_anything_are_rejected(targets: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LoraSpec.model_validate({"target_modules": targets})


def test_one_target_may_be_written_as_a_plain_string() -> None:
    assert LoraSpec.model_validate({"target_modules": "c_attn"}).target_modules == ("c_attn",)
