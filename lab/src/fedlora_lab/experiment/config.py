"""An experiment file (`experiments/*.yaml`): what every run shares, and the methods compared.

Every key is checked and unknown keys are refused; each method's run settings must pass the
coordinator's own schema (``RunSettings``) before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedlora_common.plans import Aggregation, AuditPlan, LoraSpec, Mode
from fedlora_common.settings import ConfigError, StrictModel, describe, merge, read_yaml_mapping
from fedlora_lab.datagen import DataSpec
from fedlora_lab.engines import Engine
from fedlora_lab.experiment.executors import RAY_MISSING, Executor, ray_installed
from fedlora_lab.federation import FederationPlan, run_settings, site_names
from fedlora_lab.model_factory import LabSize
from fedlora_server.config import RunSettings, WorkerEntry

__all__ = [
    "AuditSection",
    "DataSection",
    "ExperimentConfig",
    "FederationSection",
    "MethodConfig",
    "ModelSection",
    "SecaggCheckSection",
    "coordinator_settings",
    "federation_plan",
    "load_experiment_config",
]

EXPERIMENT_VERSION: Final = 1
_NAME_PATTERN: Final = r"^[A-Za-z0-9._-]+$"
_DATA_DEFAULTS: Final = DataSpec()


class ModelSection(StrictModel):
    """The base model: a lab model built (and cached) here, or an existing model directory or hub id."""

    lab: LabSize | None = "default"
    path: str | None = Field(None, min_length=1, description="A model directory or hub id; replaces `lab`")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.path is not None and self.lab is not None and "lab" in self.model_fields_set:
            raise ValueError("give either lab or path, not both")
        if self.path is None and self.lab is None:
            raise ValueError("give lab (default|small|tiny) or path")
        return self


class DataSection(StrictModel):
    """Per-site data, as ``DataSpec`` (the seed comes from the run's seed)."""

    n_train: int = Field(_DATA_DEFAULTS.n_train, ge=1)
    n_eval: int = Field(_DATA_DEFAULTS.n_eval, ge=1)
    n_canaries: int = Field(_DATA_DEFAULTS.n_canaries, ge=0)
    n_controls: int = Field(_DATA_DEFAULTS.n_controls, ge=0)
    frac_10x: float = Field(_DATA_DEFAULTS.frac_10x, ge=0, le=1)

    def spec(self, seed: int) -> DataSpec:
        return DataSpec(seed=seed, **self.model_dump())


class FederationSection(StrictModel):
    """What every run shares: one site per lab domain (clinical, legal, finance), rounds, local work."""

    sites: int = Field(3, ge=2, description="Workers; the first three are clinical, legal, finance")
    rounds: int = Field(8, ge=1)
    local_steps: int = Field(50, ge=1, description="Optimizer steps per worker per round")
    batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(256, ge=8)
    timeout_minutes: float = Field(60.0, gt=0, description="A run still going after this is stopped and failed")


class AuditSection(StrictModel):
    """The canary audit: of each run's final model at every site, and of the global model every `every` rounds."""

    prefixes: tuple[int, ...] = Field((10, 50, 100, 200), min_length=1)
    candidates: int = Field(128, ge=2, description="Random secrets each true secret is ranked among (exposure)")
    frequency_penalty: float = Field(
        0.0, ge=0, le=10, description="Greedy decoding's frequency penalty (the paper's released code uses 1.0)"
    )
    every: int | None = Field(
        1, ge=1, description="The federation audits its global model every N rounds (the per-round curves); None: off"
    )
    second_frequency_penalty: float | None = Field(
        None,
        ge=0,
        le=10,
        description="The final audit decodes a second time with this frequency penalty (the paper's released code "
        "uses 1.0), reported beside the first decoding",
    )

    @field_validator("prefixes")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(p < 1 for p in value):
            raise ValueError("every prefix length must be at least 1")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _second_decoding_differs(self) -> AuditSection:
        if self.second_frequency_penalty == self.frequency_penalty:
            raise ValueError("second_frequency_penalty: the same as frequency_penalty; give another or leave it out")
        return self

    def plan(self, frequency_penalty: float | None = None) -> AuditPlan:
        """The audit as the worker's vocabulary states it (with another frequency penalty: the second decoding)."""
        return AuditPlan(
            prefixes=self.prefixes,
            exposure_candidates=self.candidates,
            frequency_penalty=self.frequency_penalty if frequency_penalty is None else frequency_penalty,
        )

    def run_section(self) -> dict[str, Any] | None:
        """run.yaml's `audit:` for the per-round audit inside the federation (the same plan as the final one)."""
        if self.every is None:
            return None
        return {**self.plan().model_dump(mode="json"), "every": self.every}


class MethodConfig(StrictModel):
    """One compared configuration: a set of run.yaml overrides on top of the shared settings."""

    name: str = Field(min_length=1, max_length=64, pattern=_NAME_PATTERN)
    label: str | None = Field(None, description="Shown in the report; the name when absent")
    mode: Mode = "lora"
    aggregation: Aggregation = Field(
        "fedavg",
        description="fedavg: A and B averaged separately; ffa: FFA-LoRA, A frozen, only B trained and averaged",
    )
    learning_rate: float = Field(3e-3, gt=0, lt=1)
    learning_rates: tuple[float, ...] | None = Field(
        None,
        min_length=2,
        description="Swept at the experiment's sweep seed; the one with the lowest held-out loss is used "
        "(replaces learning_rate)",
    )
    lora: dict[str, Any] | None = Field(None, description="run.yaml `lora:` overrides (rank, alpha, ...)")
    secure_aggregation: bool = False
    privacy: dict[str, Any] | None = Field(None, description="run.yaml `privacy:` (client_dp, record_dp, goldfish)")
    run: dict[str, Any] = Field(default_factory=dict, description="Any further run.yaml overrides")

    @field_validator("learning_rates")
    @classmethod
    def _rates(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        if any(not 0 < rate < 1 for rate in value):
            raise ValueError("every learning rate must be in (0, 1)")
        if len(set(value)) != len(value):
            raise ValueError("must be distinct")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _one_rate(self) -> MethodConfig:
        if self.learning_rates is not None and "learning_rate" in self.model_fields_set:
            raise ValueError("give learning_rate or learning_rates (swept), not both")
        return self

    @property
    def display(self) -> str:
        return self.label or self.name

    def at_rate(self, learning_rate: float) -> MethodConfig:
        """This method trained at one learning rate: a sweep's cell, or the grid's once the sweep chose."""
        return self.model_copy(update={"learning_rate": learning_rate})

    @property
    def lora_rank(self) -> int | None:
        if self.mode == "full":
            return None
        return LoraSpec.model_validate(self.lora or {}).rank


class SecaggCheckSection(StrictModel):
    """Secure aggregation changes who sees updates, not what is learned: one method at one seed, a few rounds,
    run in the clear and masked; the two committed adapters must agree within the quantization bound."""

    method: str = Field(min_length=1, description="The method (by name) run both ways")
    seed: int = Field(0, ge=0)
    rounds: int = Field(
        1, ge=1, description="Rounds of each run; after the first, the runs train from slightly different models"
    )


class ExperimentConfig(StrictModel):
    """An experiment file (`experiments/*.yaml`); every key is checked, unknown keys are refused."""

    version: Literal[1] = EXPERIMENT_VERSION
    name: str = Field("experiment", min_length=1)
    description: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    federation: FederationSection = FederationSection()
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    sweep_seed: int | None = Field(
        None,
        ge=0,
        description="The seed whose runs choose each swept method's learning rate, by held-out loss alone; "
        "never one of the reported seeds, so its data (and held-out records) are never reported on",
    )
    engine: Engine = Field(
        "simulation",
        description="simulation: each run one process, its sites training at once over one loaded model; "
        "processes: a coordinator and a worker per site, each a process, over gRPC",
    )
    parallel: int = Field(
        2,
        ge=1,
        description="Runs side by side (simulation: the cores are split among them); on Ray, the tasks in flight",
    )
    executor: Executor = Field(
        "local",
        description="local: the runs are threads of this process; ray: each run a Ray task "
        "(pip install 'fedlora-lab[ray]'), on a local Ray or the cluster at ray_address",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="A Ray cluster to run on (auto, ray://head:10001); None: a Ray started here with `parallel` CPUs",
    )
    audit: AuditSection = AuditSection()
    methods: tuple[MethodConfig, ...] = Field(min_length=1)
    secagg_check: SecaggCheckSection | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in value):
            raise ValueError("every seed must be >= 0")
        if len(set(value)) != len(value):
            raise ValueError("must be distinct")
        return value

    @field_validator("executor")
    @classmethod
    def _ray_is_installed(cls, value: Executor) -> Executor:
        if value == "ray" and not ray_installed():
            raise ValueError(RAY_MISSING)
        return value

    @field_validator("methods")
    @classmethod
    def _distinct_names(cls, value: tuple[MethodConfig, ...]) -> tuple[MethodConfig, ...]:
        names = [m.name for m in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"method names must be distinct; repeated: {', '.join(duplicated)}")
        return value

    @model_validator(mode="after")
    def _runs_are_valid(self) -> ExperimentConfig:
        """Every method's run.yaml must pass the coordinator's own schema, checked before anything runs."""
        probe = Path("probe")
        for index, method in enumerate(self.methods):
            plan = federation_plan(self, method, self.seeds[0], out_dir=probe, base_model=probe)
            try:
                coordinator_settings(plan)
            except ValidationError as exc:
                raise ValueError(f"methods.{index} ({method.name}): run.yaml {describe(exc)}") from None
        return self

    @model_validator(mode="after")
    def _sweep_has_its_own_seed(self) -> ExperimentConfig:
        swept = [m.name for m in self.methods if m.learning_rates is not None]
        if swept and self.sweep_seed is None:
            raise ValueError(f"sweep_seed: required, {', '.join(swept)} sweep learning_rates")
        if self.sweep_seed is not None and self.sweep_seed in self.seeds:
            raise ValueError(f"sweep_seed: {self.sweep_seed} is a reported seed; choose one that is not")
        return self

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ExperimentConfig:
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address: only with executor: ray")
        return self

    @model_validator(mode="after")
    def _check_names_a_method(self) -> ExperimentConfig:
        check = self.secagg_check
        if check is not None:
            method = next((m for m in self.methods if m.name == check.method), None)
            if method is None:
                raise ValueError(f"secagg_check.method: no method named {check.method!r}")
            if method.secure_aggregation:
                raise ValueError(f"secagg_check.method: {check.method!r} already runs with secure aggregation")
        return self

    def method(self, name: str) -> MethodConfig:
        return next(m for m in self.methods if m.name == name)

    def varies_rank(self) -> bool:
        ranks = {m.lora_rank for m in self.methods if m.lora_rank is not None}
        return len(ranks) > 1

    def fingerprint(self, method: MethodConfig, seed: int) -> str:
        """What a run's result depends on; a stored result with another fingerprint is redone. Where runs go
        (parallel, executor) is not in it: the same run gives the same result on any executor."""
        payload = {
            "version": self.version,
            "model": self.model.model_dump(),
            "data": self.data.model_dump(),
            "federation": self.federation.model_dump(),
            "engine": self.engine,
            "audit": self.audit.model_dump(),
            "method": method.model_dump(exclude={"label"}),
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def federation_plan(
    config: ExperimentConfig, method: MethodConfig, seed: int, *, out_dir: Path, base_model: Path
) -> FederationPlan:
    """One run: the shared federation with this method's settings and this seed's data."""
    fed = config.federation
    training = {
        "local_steps": fed.local_steps,
        "batch_size": fed.batch_size,
        "max_seq_len": fed.max_seq_len,
        "learning_rate": method.learning_rate,
    }
    run: dict[str, Any] = {"training": training, "lora": method.lora or {}, "privacy": method.privacy or {}}
    audit = config.audit.run_section()
    if audit is not None:
        run["audit"] = audit
    return FederationPlan(
        out_dir=out_dir,
        base_model=base_model,
        workers=fed.sites,
        rounds=fed.rounds,
        mode=method.mode,
        aggregation=method.aggregation,
        seed=seed,
        data=config.data.spec(seed),
        run=merge(run, method.run),
        run_id=f"{method.name}-seed-{seed}",
        secure_aggregation=method.secure_aggregation,
        threads_per_worker=1,
        timeout=timedelta(minutes=fed.timeout_minutes),
    )


def coordinator_settings(plan: FederationPlan) -> RunSettings:
    """The run.yaml a federation plan gives its coordinator (placeholder worker keys); ValidationError if bad."""
    workers = [
        WorkerEntry(id=worker_id, token_sha256="0" * 64, identity_public="0" * 64)
        for worker_id, _ in site_names(plan.workers)
    ]
    return run_settings(plan, base_model=str(plan.base_model), state_dir=plan.out_dir, workers=workers)


def load_experiment_config(path: Path) -> ExperimentConfig:
    """Read and validate an experiment file; raise ConfigError with one line naming the field."""
    data = read_yaml_mapping(path)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
