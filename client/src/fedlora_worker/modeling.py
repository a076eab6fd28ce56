"""Load the base model for one of the three training modes, and move its global state in and out.

The global state is what the federation averages: the LoRA adapter tensors (lora, qlora) or every
parameter (full). It leaves and enters the model as float32 numpy arrays named and ordered by the
manifest, so the coordinator never needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.plans import LoraSpec, Mode, RunSpec
from fedlora_common.settings import StrictModel

__all__ = [
    "LoadedModel",
    "SiteModel",
    "artifact_config_json",
    "global_state",
    "load_model",
    "lora_config",
    "set_global_state",
]

_ADAPTER = "default"


class SiteModel(StrictModel):
    """What only this site decides about the run's base model; the run decides everything else (RunSpec)."""

    path: str = Field(min_length=1, description="Local path (or hub id) of this site's copy of the base model")
    device: str = Field("cpu", min_length=1)
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Base weights and compute (qlora: compute)")


@dataclass
class LoadedModel:
    """A model ready to train, with the manifest that names and orders its global state."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    run: RunSpec
    site: SiteModel
    manifest: Manifest

    @property
    def pad_id(self) -> int:
        """The padding id; many causal LM tokenizers have no pad token, and any id works under the mask."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer of {self.site.path} has neither a pad nor an eos token")
        return int(pad)


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The run's LoRA settings as peft's object: the one place the vocabulary meets peft."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )


def load_model(run: RunSpec, site: SiteModel) -> LoadedModel:
    """Load base model and tokenizer, and wrap the model in a seeded LoRA adapter unless mode is full.

    The adapter is attached only once the model is on its device: peft (and Opacus after it) must see
    the final parameters, or the trained update can silently stay zero.
    """
    dtype = getattr(torch, site.dtype)
    quantization = None
    if run.mode == "qlora":
        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    tokenizer = AutoTokenizer.from_pretrained(site.path)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        site.path, dtype=dtype, quantization_config=quantization, device_map={"": site.device}
    )
    if run.mode != "full":
        # Same seed, same A at every site (FFA-LoRA keeps it forever); the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            model = get_peft_model(model, lora_config(run.lora))
        if run.aggregation == "ffa":
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
    tensors = _global_tensors(model, run.mode)
    manifest = Manifest(tuple(TensorSpec(name, tuple(t.shape)) for name, t in tensors.items()))
    return LoadedModel(model=model, tokenizer=tokenizer, run=run, site=site, manifest=manifest)


def _global_tensors(model: torch.nn.Module, mode: Mode) -> dict[str, torch.Tensor]:
    """The live tensors of the global state, keyed by their manifest (wire and file) names."""
    if mode == "full":
        return dict(model.named_parameters())  # tied weights appear once
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(
        model, adapter_name=_ADAPTER, save_embedding_layers=False
    )
    return state


def global_state(loaded: LoadedModel) -> dict[str, npt.NDArray[np.float32]]:
    """Float32 copies of the global state in manifest order (copies: training must not move them)."""
    return {
        name: tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()
        for name, tensor in _global_tensors(loaded.model, loaded.run.mode).items()
    }


def set_global_state(loaded: LoadedModel, state: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Overwrite the global state; names and shapes must match the manifest exactly."""
    expected = {spec.name: spec.shape for spec in loaded.manifest.tensors}
    for name in state:
        if name not in expected:
            raise ValueError(f"tensor {name}: not in the manifest")
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"tensor {name}: missing")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"tensor {name}: shape {tuple(state[name].shape)} != manifest {shape}")
    tensors = {name: torch.tensor(np.asarray(state[name], dtype=np.float32)) for name in expected}
    if loaded.run.mode != "full":
        set_peft_model_state_dict(loaded.model, tensors, adapter_name=_ADAPTER)
        return
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            param.copy_(tensors[name])


def artifact_config_json(loaded: LoadedModel) -> str:
    """The config file to ship beside the state: peft's adapter_config.json, or the model's config.json.

    Mirrors ``PeftConfig.save_pretrained`` (sets as lists, saved in inference mode) but sorts the
    lists, so every process writes byte-identical JSON whatever its hash seed.
    """
    if loaded.run.mode == "full":
        text: str = cast(PreTrainedModel, loaded.model).config.to_json_string()
        return text
    config: dict[str, Any] = cast(PeftModel, loaded.model).peft_config[_ADAPTER].to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    config["base_model_name_or_path"] = loaded.site.path
    config["inference_mode"] = True
    return json.dumps(config, indent=2, sort_keys=True)
