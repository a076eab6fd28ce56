"""The run's settings vocabulary: validated once where it enters, carried on the wire, used as is.

The coordinator's `run.yaml` sections are these models (or extend them with what only the
coordinator needs); `fedlora_common.serde` carries them over the wire; the worker hands them
straight to peft (`LoraSpec` -> `LoraConfig`) and to its training loop. Defaults and validation
live here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedlora_common.settings import StrictModel

__all__ = [
    "ALL_LINEAR",
    "MODE_PRECISIONS",
    "Aggregation",
    "AuditPlan",
    "BasePrecision",
    "GoldfishPlan",
    "LoraSpec",
    "LrSchedule",
    "Mode",
    "Precision",
    "RecordDPPlan",
    "RunSpec",
    "TrainingPlan",
    "TrainingSettings",
]

ALL_LINEAR = "all-linear"
"""LoRA target shorthand: every linear layer of the transformer blocks except the output head (peft's)."""

Mode = Literal["lora", "qlora", "full"]
"""lora: LoRA on a float base; qlora: LoRA on a 4-bit NF4 base; full: every weight (the baseline)."""

Aggregation = Literal["fedavg", "ffa", "hetlora"]
"""fedavg: A and B averaged separately; ffa: A frozen at the shared seeded init, only B travels; hetlora: each site
trains the leading rank-r_i rows of A and columns of B its hardware allows (Cho et al. 2024, zero-padded to the
run's rank), and each rank index is averaged over the sites that trained it."""

BasePrecision = Literal["nf4", "bfloat16", "float32"]
"""How a site loads the frozen base: 4-bit NF4 (QLoRA), or bfloat16 / float32 weights."""

MODE_PRECISIONS: dict[str, tuple[BasePrecision, ...]] = {
    "lora": ("bfloat16", "float32"),
    "qlora": ("nf4",),
    "full": ("bfloat16", "float32"),
}
"""The base precisions a run of each mode allows when run.yaml names none."""


def _require(data: Any, field: str, why: str) -> Any:
    """A friendlier 'Field required' for a field whose absence would silently weaken privacy."""
    if isinstance(data, dict) and data.get(field) is None:
        raise ValueError(f"{why}: set {field} > 0")
    return data


class LoraSpec(StrictModel):
    """peft's LoRA knobs, as every site must build them."""

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path during training")
    target_modules: tuple[str, ...] = Field(
        (ALL_LINEAR,),
        min_length=1,
        description=(
            "Module names (suffixes) to adapt, or all-linear: every linear layer of the transformer blocks "
            "but the output head, whatever the family calls them (peft's all-linear)"
        ),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"{ALL_LINEAR} already adapts every linear layer; name modules or give {ALL_LINEAR} alone")
        if any(not name.strip() for name in value):
            raise ValueError("module names must not be empty")
        return value


LrSchedule = Literal["constant", "linear", "cosine"]
"""How the learning rate moves over the run's optimizer steps, after the warmup."""

Precision = Literal["auto", "bf16", "fp32"]
"""auto: bf16 autocast on a CUDA device that supports it, float32 elsewhere; bf16: autocast everywhere; fp32: never."""


class TrainingSettings(StrictModel):
    """Local training each round (run.yaml `training:`)."""

    local_steps: int = Field(20, ge=1, description="Optimizer steps per round at each site")
    batch_size: int = Field(
        8,
        ge=1,
        description=(
            "Windows per optimizer step, over all of a site's processes (records per draw under DP-SGD); "
            "micro_batch_size splits it"
        ),
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Windows per forward pass in each of a site's processes (records under DP-SGD); each step adds up "
            "the gradients of its micro-batches into the batch's. Absent: the whole batch at once"
        ),
    )
    learning_rate: float = Field(3e-3, gt=0, description="AdamW learning rate (the peak, with a schedule)")
    lr_schedule: LrSchedule = Field(
        "constant",
        description=(
            "After warmup_steps, the learning rate stays (constant) or decays linearly or along a cosine to "
            "min_lr_ratio x learning_rate over the run's steps (rounds x local_steps), continuing from round to round"
        ),
    )
    warmup_steps: int = Field(
        0, ge=0, description="Run-wide optimizer steps over which the learning rate rises linearly to learning_rate"
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Where linear and cosine decay end, as a fraction of learning_rate"
    )
    max_seq_len: int = Field(256, ge=8, description="Tokens per training window")
    packing: bool = Field(
        False,
        description=(
            "Fill each window with whole short records (eos-separated; attention spans them) instead of padding "
            "each alone; every token is still predicted once. Not with record-level DP-SGD"
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute each block's activations in the backward pass: less GPU memory, about 1/3 more compute. "
            "Not with record-level DP-SGD"
        ),
    )
    precision: Precision = Field(
        "auto",
        description=(
            "auto: bf16 autocast on CUDA devices that support it, float32 elsewhere; bf16: autocast everywhere; "
            "fp32: never autocast"
        ),
    )
    grad_clip_norm: float = Field(1.0, gt=0, description="L2 clip of each step's gradient")
    proximal_mu: float = Field(
        0.0,
        ge=0,
        description=(
            "FedProx (Li et al. 2020): each site adds mu/2 * ||w - w_global||^2 over what it trains to its loss, "
            "so sites with unequal data drift less from the round's model; 0: plain local training"
        ),
    )
    update_clip_norm: float = Field(0.0, ge=0, description="L2 bound on each update; 0 leaves it unbounded")

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> TrainingSettings:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size: {self.micro_batch_size} exceeds batch_size {self.batch_size}; "
                "a micro-batch is a part of the step's batch"
            )
        return self


class GoldfishPlan(StrictModel):
    """Goldfish loss (Hans et al. 2024): drop about 1/k of tokens, chosen by a hash of the h before them."""

    k: int = Field(4, ge=2, description="About 1/k of the tokens leave the loss (k=1 would drop all)")
    h: int = Field(13, ge=1, description="Tokens of context hashed to decide each drop")
    seed: int = Field(0, ge=0, description="Key of the hash")


class RecordDPPlan(StrictModel):
    """Record-level DP-SGD at every site (Opacus): per-record clipping, Gaussian noise of std z * clip."""

    noise_multiplier: float = Field(gt=0, description="Noise std as a multiple of max_grad_norm")
    max_grad_norm: float = Field(gt=0, description="Per-record gradient clip; noise needs it")
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta the record-level epsilon is stated at")

    @model_validator(mode="before")
    @classmethod
    def _clipped(cls, data: Any) -> Any:
        return _require(data, "max_grad_norm", "noise without clipping bounds nothing")


class TrainingPlan(TrainingSettings):
    """One round's training, as the coordinator hands it out: the settings plus what it derives.

    seed fixes batch order and dropout (it changes every round); update_clip_norm is the client-DP
    clip when client-level DP is on. schedule_start and schedule_steps place the round's steps on the
    run's learning-rate schedule; they follow from the round number alone, so a retried attempt of a
    round trains on the same stretch of the schedule.
    """

    seed: int = Field(0, ge=0)
    goldfish: GoldfishPlan | None = None
    record_dp: RecordDPPlan | None = None
    schedule_start: int = Field(0, ge=0, description="Optimizer steps the run took before this round")
    schedule_steps: int = Field(
        0, ge=0, description="Optimizer steps of the whole run (rounds x local_steps); 0: this round's local_steps"
    )

    @model_validator(mode="after")
    def _round_within_schedule(self) -> TrainingPlan:
        if self.schedule_steps and self.schedule_start + self.local_steps > self.schedule_steps:
            raise ValueError(
                f"schedule_start: steps {self.schedule_start}..{self.schedule_start + self.local_steps} "
                f"run past the schedule's {self.schedule_steps}"
            )
        return self

    @model_validator(mode="after")
    def _record_dp_trainable(self) -> TrainingPlan:
        """DP-SGD clips each record's own gradient: windows that mix records, or recomputed activations, cannot."""
        if self.record_dp is not None and self.packing:
            raise ValueError(
                "training.packing: not with privacy.record_dp (a packed window holds several records, so DP-SGD "
                "could not clip each record's gradient); turn packing off"
            )
        if self.record_dp is not None and self.gradient_checkpointing:
            raise ValueError(
                "training.gradient_checkpointing: not with privacy.record_dp (Opacus' per-record gradients need "
                "the activations it would recompute); micro_batch_size bounds memory instead"
            )
        return self


class AuditPlan(StrictModel):
    """The canary audit a worker runs on a new global model; only aggregate rates leave a site."""

    prefixes: tuple[int, ...] = Field(
        (10, 50, 100, 200, 500), min_length=1, description="Prompt lengths (tokens), as each record allows"
    )
    suffix_tokens: int = Field(50, ge=1, description="Tokens decoded and compared after each prefix")
    exposure_candidates: int = Field(128, ge=2, description="Random candidates the secret is ranked among")
    frequency_penalty: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description=(
            "Subtracted from a token's logit once per time the continuation already holds it, before each "
            "greedy pick (OpenAI's frequency_penalty; Bossy et al. decode with 1.0); 0 decodes plain argmax"
        ),
    )

    @model_validator(mode="after")
    def _positive_prefixes(self) -> AuditPlan:
        if any(p < 1 for p in self.prefixes):
            raise ValueError("prefixes: every prefix length must be >= 1")
        if len(set(self.prefixes)) != len(self.prefixes):
            raise ValueError("prefixes: must be distinct")
        return self


class RunSpec(StrictModel):
    """What is fixed for the whole run; every site builds the same model and initial adapter from it."""

    run_id: str = Field(min_length=1)
    mode: Mode
    aggregation: Aggregation
    base_model: str
    lora: LoraSpec
    total_rounds: int = Field(ge=1)
    seed: int = Field(ge=0)
    base_precisions: tuple[BasePrecision, ...] = Field(
        (),
        description=(
            "How sites may load the base (each site picks in worker.yaml `base_precision`): nf4, bfloat16, "
            "float32; empty: the mode's own (lora: bfloat16 or float32, qlora: nf4, full: bfloat16 or float32)"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if self.mode == "full" and self.aggregation in ("ffa", "hetlora"):
            raise ValueError(f"aggregation: {self.aggregation} applies to LoRA adapters, not to mode full")
        if self.mode == "full" and "nf4" in self.base_precisions:
            raise ValueError("base_precisions: full fine-tuning trains every weight, which a 4-bit NF4 base cannot")
        if len(set(self.base_precisions)) != len(self.base_precisions):
            raise ValueError("base_precisions: each precision once")
        return self

    @property
    def allowed_precisions(self) -> tuple[BasePrecision, ...]:
        return self.base_precisions or MODE_PRECISIONS[self.mode]
