"""`fedlora-lab merge`: a LoRA adapter folded into its base, saved as a model that loads on its own.

peft's `merge_and_unload` adds B·A·(alpha/r) into each adapted weight; the result is saved with
`save_pretrained` beside the base's tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR)` needs
neither peft nor the base. Every input is checked before the merge: the adapter must be a peft
adapter whose every tensor lands on a module of the base with its shape. The model is written
into a directory beside DIR and renamed into place: DIR holds the whole model or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

__all__ = ["MergeError", "MergeResult", "merge_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MergeError(Exception):
    """A merge refused; the message is one line naming the argument and the fault."""


@dataclass(frozen=True)
class MergeResult:
    out: Path
    merged_modules: int
    """Modules whose weight took the adapter's update."""
    parameters: int
    tokenizer: bool
    """Whether the base's tokenizer was saved beside the model (a base without one has none to give)."""


def _check_paths(base: Path, adapter: Path, out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise MergeError(f"--out {out}: exists and is not empty; a merge never overwrites")
    if not (base / "config.json").is_file():
        raise MergeError(f"--base {base}: not a model directory (no config.json)")
    if not (adapter / ADAPTER_CONFIG).is_file():
        held = (
            " (it holds a whole model: load it with AutoModelForCausalLM)"
            if (adapter / "config.json").is_file()
            else ""
        )
        raise MergeError(f"--adapter {adapter}: not a peft adapter directory (no {ADAPTER_CONFIG}){held}")
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(f"--adapter {adapter}: {ADAPTER_CONFIG} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise MergeError(f"--adapter {adapter}: not a LoRA adapter (peft_type {kind!r})")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise MergeError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS}")


def _adapted(base_model: torch.nn.Module, base: Path, adapter: Path) -> PeftModel:
    """The base with the adapter loaded, once every tensor of the adapter found its place and shape."""
    try:
        saved = load_file(str(adapter / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise MergeError(f"--adapter {adapter}: {ADAPTER_WEIGHTS} cannot be read ({exc})") from None
    try:
        model = PeftModel.from_pretrained(base_model, adapter)
    except (ValueError, RuntimeError, KeyError) as exc:  # targets the base lacks, shapes that differ
        reason = " ".join(str(exc).split())[:300]
        raise MergeError(f"--adapter {adapter} does not fit --base {base}: {reason}") from None
    loaded = get_peft_model_state_dict(model)
    unplaced = sorted(name for name in saved if name not in loaded)
    if unplaced:
        raise MergeError(
            f"--adapter {adapter} does not fit --base {base}: {len(unplaced)} of its tensors match no module "
            f"of the base (first: {unplaced[0]})"
        )
    wrong = [name for name, tensor in saved.items() if tuple(tensor.shape) != tuple(loaded[name].shape)]
    if wrong:
        raise MergeError(f"--adapter {adapter} does not fit --base {base}: {wrong[0]} has another shape")
    return model


def _tokenizer(base: Path) -> PreTrainedTokenizerBase | None:
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer


def merge_adapter(base: Path, adapter: Path, out: Path) -> MergeResult:
    """Merge the LoRA adapter at `adapter` into the model at `base`; save it to `out` (absent or empty)."""
    _check_paths(base, adapter, out)
    try:
        base_model = AutoModelForCausalLM.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise MergeError(f"--base {base}: cannot be loaded ({' '.join(str(exc).split())[:300]})") from None
    model = _adapted(base_model, base, adapter)
    merged_modules = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    tokenizer = _tokenizer(base)
    merged = model.merge_and_unload()
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.merge-{os.getpid()}")
    try:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # onto an empty directory, or none
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    parameters = sum(p.numel() for p in merged.parameters())
    return MergeResult(out, merged_modules, parameters, tokenizer is not None)
