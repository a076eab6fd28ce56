"""Load the base model for one of the three training modes, and move its global state in and out.

The global state is what the federation averages: the LoRA adapter tensors (lora, qlora) or every
parameter (full). It leaves and enters the model as float32 numpy arrays named and ordered by the
manifest, so the coordinator never needs torch.

Any causal LM: the default targets (``all-linear``) are every linear layer of the transformer blocks
but the output head, whatever the family names them (Conv1D included: GPT-2), and the routed experts a
mixture of experts fuses into one parameter per projection. Targets named by the
run must each match a module of this site's model, or loading refuses with `SiteMismatch`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import structlog
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from pydantic import Field
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from fedlora_common.blocks import block_groups, pad_to_rank, truncate_to_rank
from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.plans import ALL_LINEAR, BasePrecision, LoraSpec, Mode, RunSpec
from fedlora_common.settings import StrictModel
from fedlora_worker.config import DeviceMap
from fedlora_worker.dropout import own_dropout

__all__ = [
    "LoadedModel",
    "SiteMismatch",
    "SiteModel",
    "artifact_config_json",
    "experts_to_adapt",
    "fused_experts",
    "global_state",
    "linear_layers",
    "load_model",
    "lora_config",
    "resolved_dtype",
    "set_global_state",
    "site_precision",
    "site_rank",
]

_ADAPTER = "default"
log = structlog.get_logger()


class SiteMismatch(ValueError):
    """The run does not fit this site: its LoRA targets match no module of this site's base model (the message
    names the modules it has), or the site's rank or precision is one the run does not allow. The site refuses
    the run at join, in one line."""


class SiteModel(StrictModel):
    """What only this site decides about the run's base model; the run decides everything else (RunSpec)."""

    path: str = Field(min_length=1, description="Local path (or hub id) of this site's copy of the base model")
    device: str = Field("cpu", min_length=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Base weights and compute (qlora: compute); auto: bfloat16 for lora and qlora on a CUDA device that "
            "supports it, float32 otherwise"
        ),
    )
    device_map: DeviceMap = Field("device", description="device: all on `device`; auto: the base spread over GPUs")
    gpus: tuple[int, ...] = Field((), description="GPUs device_map auto may use; empty: every visible one")
    max_memory_per_gpu: str | None = Field(None, description="device_map auto: at most this much per GPU (20GiB)")
    base_precision: Literal["auto", "nf4", "bfloat16", "float32"] = Field(
        "auto", description="How this site loads the base; auto: the run's mode (qlora: nf4) and `dtype`"
    )
    max_rank: int | None = Field(None, ge=1, description="The most LoRA rank this site trains (hetlora runs)")


@dataclass
class LoadedModel:
    """A model ready to train, with the manifest that names and orders its global state."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    run: RunSpec
    site: SiteModel
    manifest: Manifest
    """The global state's tensors at the run's rank: what travels, whatever rank this site trains."""
    adapted_modules: tuple[str, ...] = ()
    """Full names of the modules that carry a LoRA adapter (none for mode full)."""
    rank: int = 0
    """The rank this site trains: the run's, or less under hetlora (0 for mode full)."""
    precision: BasePrecision = "float32"
    held: dict[str, npt.NDArray[np.float32]] | None = None
    """The last global state set, at the run's rank: a site of less rank pads what it trains from it."""

    @property
    def pad_id(self) -> int:
        """The padding id; many causal LM tokenizers have no pad token, and any id works under the mask."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer of {self.site.path} has neither a pad nor an eos token")
        return int(pad)


def lora_config(spec: LoraSpec, experts: Sequence[str] = (), *, rank: int | None = None) -> LoraConfig:
    """The run's LoRA settings as peft's object: the one place the vocabulary meets peft. `experts` are fused
    expert parameters (`fused_experts`) to adapt as parameters beside the modules. A site of less `rank`
    (hetlora) scales alpha with it, so alpha / r, what scales B A, is the run's and its leading ranks of the
    global adapter compute what they compute at the run's rank."""
    rank = spec.rank if rank is None else rank
    return LoraConfig(
        r=rank,
        # peft annotates an int; it only ever divides alpha by r, and a scaled alpha may be fractional.
        lora_alpha=spec.alpha if rank == spec.rank else spec.alpha * rank / spec.rank,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        # peft resolves the string "all-linear" itself; a list would be taken for module names.
        target_modules=ALL_LINEAR if spec.target_modules == (ALL_LINEAR,) else list(spec.target_modules),
        target_parameters=list(experts) or None,
        task_type="CAUSAL_LM",
    )


def fused_experts(model: torch.nn.Module) -> list[str]:
    """A mixture of experts' routed experts stacked in one 3-d parameter per projection (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE in transformers 5), by owning module's and parameter's last names (experts.gate_up_proj),
    as peft's `target_parameters` takes them: no linear layer holds them, so all-linear alone misses them."""
    return list(
        dict.fromkeys(
            f"{module_name.rsplit('.', 1)[-1]}.{name}"
            for module_name, module in model.named_modules()
            for name, param in module.named_parameters(recurse=False)
            if param.ndim == 3
        )
    )


def experts_to_adapt(model: torch.nn.Module, spec: LoraSpec, path: str) -> list[str]:
    """The fused experts all-linear adapts; peft wraps them without dropout only, so a run with dropout is refused
    in one line that says what to set (named targets adapt the modules they name, and no experts)."""
    if spec.target_modules != (ALL_LINEAR,):
        return []
    experts = fused_experts(model)
    if experts and spec.dropout != 0:
        raise SiteMismatch(
            f"lora.dropout: {spec.dropout:g}, but {path} ({type(model).__name__}) keeps its routed experts in fused "
            f"parameters ({', '.join(experts)}), which peft adapts only without dropout: set lora.dropout: 0 in "
            "run.yaml, or name lora.target_modules to adapt modules alone"
        )
    return experts


def linear_layers(model: torch.nn.Module) -> list[str]:
    """What all-linear adapts, as peft resolves it: every Linear or Conv1D module but the output head."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None  # type: ignore[no-untyped-call]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
    ]


def _check_targets(model: torch.nn.Module, spec: LoraSpec, path: str) -> None:
    """Every target the run names must match a module (as peft matches: the name, or its last parts)."""
    names = [name for name, _ in model.named_modules()]
    linear = linear_layers(model)
    if spec.target_modules == (ALL_LINEAR,):
        missing: list[str] = [] if linear else [ALL_LINEAR]
    else:
        missing = [t for t in spec.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise SiteMismatch(
            f"lora.target_modules: {', '.join(missing)} match no module of {path} ({type(model).__name__}); "
            f"{_found(linear)}"
        )


def _found(linear: list[str]) -> str:
    if not linear:
        return "it has no linear layer to adapt"
    return f"its linear layers are {', '.join(_leaves(linear))} ({ALL_LINEAR} adapts them all)"


def _leaves(modules: list[str] | tuple[str, ...]) -> list[str]:
    """Distinct last parts of module names, in order of first appearance: q_proj, not layers.0.self_attn.q_proj."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in modules))


def load_model(run: RunSpec, site: SiteModel) -> LoadedModel:
    """Load base model and tokenizer, and wrap the model in a seeded LoRA adapter unless mode is full.

    The adapter is attached only once the model is on its device: peft (and Opacus after it) must see
    the final parameters, or the trained update can silently stay zero.
    """
    precision = site_precision(run, site)
    rank = site_rank(run, site)
    dtype = resolved_dtype(site, run.mode) if precision == "nf4" else cast(torch.dtype, getattr(torch, precision))
    quantization = None
    if precision == "nf4":
        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    tokenizer = AutoTokenizer.from_pretrained(site.path)
    device_map, max_memory = _placement(site)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        site.path, dtype=dtype, quantization_config=quantization, device_map=device_map, max_memory=max_memory
    )
    if site.device_map == "auto":
        log.info("base_model_placed", devices=sorted({str(p.device) for p in model.parameters()}))
    if precision == "nf4":
        _same_4bit_compute_on_every_cpu(model)
    adapted: tuple[str, ...] = ()
    held: dict[str, npt.NDArray[np.float32]] | None = None
    if run.mode != "full":
        _check_targets(model, run.lora, site.path)
        experts = experts_to_adapt(model, run.lora, site.path)
        # Same seed, same A at every site (FFA-LoRA keeps it forever); the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            try:
                model = get_peft_model(model, lora_config(run.lora, experts))
            except ValueError as exc:  # e.g. a named target that is not a layer peft can adapt
                reason = " ".join(str(exc).split())[:300]
                raise SiteMismatch(f"lora.target_modules: {reason}; {_found(linear_layers(model))}") from None
        if rank < run.lora.rank:  # the run's seeded rank-R adapter is the global start; this site trains its lead
            held = _copies(_global_tensors(model, run.mode))
            model = get_peft_model(cast(PeftModel, model).unload(), lora_config(run.lora, experts, rank=rank))
        if run.aggregation == "ffa":
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
        adapted = tuple(name.removeprefix("base_model.model.") for name in _adapter_modules(model))
    shapes = {name: tuple(t.shape) for name, t in (held or _global_tensors(model, run.mode)).items()}
    manifest = Manifest(tuple(TensorSpec(name, shape) for name, shape in shapes.items()))
    if run.aggregation == "hetlora":
        try:
            block_groups(manifest, rank=run.lora.rank, heterogeneous=True)
        except ValueError as exc:
            raise SiteMismatch(f"aggregation: hetlora, but {exc}") from None
    own_dropout(model)  # each model draws its dropout masks from its own generator, seeded per round by training
    _log_trainable(model, run, adapted)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        run=run,
        site=site,
        manifest=manifest,
        adapted_modules=adapted,
        rank=rank,
        precision=precision,
    )
    if held is not None:
        set_global_state(loaded, held)
    return loaded


def site_precision(run: RunSpec, site: SiteModel) -> BasePrecision:
    """How this site loads the base: as worker.yaml says, or under auto as the run's mode does (qlora: nf4)
    in the site's dtype; SiteMismatch for a precision the run does not allow."""
    if site.base_precision != "auto":
        precision: BasePrecision = site.base_precision
    elif run.mode == "qlora":
        precision = "nf4"
    else:
        precision = "bfloat16" if resolved_dtype(site, run.mode) == torch.bfloat16 else "float32"
    if precision not in run.allowed_precisions:
        raise SiteMismatch(
            f"base_precision: {precision}, but this run allows {', '.join(run.allowed_precisions)} "
            "(run.yaml base_precisions); set one of them in worker.yaml"
        )
    return precision


def site_rank(run: RunSpec, site: SiteModel) -> int:
    """The LoRA rank this site trains: the run's, or its worker.yaml `lora.max_rank` when less (hetlora only)."""
    if run.mode == "full":
        return 0
    rank = min(site.max_rank or run.lora.rank, run.lora.rank)
    if rank < run.lora.rank and run.aggregation != "hetlora":
        raise SiteMismatch(
            f"lora.max_rank: {site.max_rank}, but this run trains rank {run.lora.rank} at every site; a site of less "
            "rank takes part only in a run with aggregation: hetlora"
        )
    return rank


def _copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, npt.NDArray[np.float32]]:
    return {name: t.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy() for name, t in tensors.items()}


def _same_4bit_compute_on_every_cpu(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers off its fused AVX512-BF16 CPU path, which it takes for inference alone.

    That path repacks weights in place, computes in bfloat16 whatever the run's dtype, and asserts on layers whose
    output width is not a multiple of 32 (small or unusual models fail their first evaluation). Without it a
    site's held-out loss and audit are computed as its training is, and the same on any CPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module types attributes as tensors)


def resolved_dtype(site: SiteModel, mode: Mode) -> torch.dtype:
    """The base's dtype: as the site says, or for auto bfloat16 under (Q)LoRA on a GPU with bf16, else float32.

    Full fine-tuning stays float32 under auto: AdamW steps on bfloat16 weights round away.
    """
    if site.dtype != "auto":
        return cast(torch.dtype, getattr(torch, site.dtype))
    on_gpu = site.device.startswith("cuda") or (site.device_map == "auto" and torch.cuda.is_available())
    if on_gpu and mode != "full" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _placement(site: SiteModel) -> tuple[str | dict[str, str], dict[int | str, int | str] | None]:
    """from_pretrained's device_map and max_memory: one device, or accelerate's spread over the site's GPUs."""
    if site.device_map == "device":
        return {"": site.device}, None
    gpus = site.gpus or tuple(range(torch.cuda.device_count()))
    if not gpus:  # no GPU: accelerate keeps it all on the CPU
        return "auto", None
    limit = site.max_memory_per_gpu
    return "auto", {gpu: limit if limit is not None else torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}


def _adapter_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _log_trainable(model: torch.nn.Module, run: RunSpec, adapted: tuple[str, ...]) -> None:
    """Log what trains: the adapted modules (by last name, and how many) and the trainable fraction."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    else:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        trainable = total
    log.info(
        "model_loaded",
        mode=run.mode,
        targets=list(run.lora.target_modules) if run.mode != "full" else None,
        adapted_modules=_leaves(adapted) if run.mode != "full" else None,
        adapted_count=len(adapted),
        trainable_parameters=trainable,
        parameters=total,
        trainable_fraction=round(trainable / total, 6) if total else 0.0,
    )


def _global_tensors(model: torch.nn.Module, mode: Mode) -> dict[str, torch.Tensor]:
    """The live tensors of the global state, keyed by their manifest (wire and file) names."""
    if mode == "full":
        return dict(model.named_parameters())  # tied weights appear once
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(
        model, adapter_name=_ADAPTER, save_embedding_layers=False
    )
    return state


def global_state(loaded: LoadedModel) -> dict[str, npt.NDArray[np.float32]]:
    """Float32 copies of the global state in manifest order (copies: training must not move them), at the run's
    rank: a site of less rank writes what it trained over the leading ranks of the state it was last given."""
    state = _copies(_global_tensors(loaded.model, loaded.run.mode))
    if loaded.held is None:
        return state
    return pad_to_rank(state, loaded.held, site_rank=loaded.rank)


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
    if loaded.rank and loaded.rank < loaded.run.lora.rank:
        loaded.held = {name: np.array(state[name], dtype=np.float32) for name in expected}
        state = truncate_to_rank(loaded.held, rank=loaded.run.lora.rank, site_rank=loaded.rank)
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
    config.update(r=loaded.run.lora.rank, lora_alpha=loaded.run.lora.alpha)  # the global adapter's, at any site
    config["base_model_name_or_path"] = loaded.site.path
    config["inference_mode"] = True
    return json.dumps(config, indent=2, sort_keys=True)
