"""The coordinator's run configuration (`run.yaml`), validated before anything starts."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedlora_common.settings import StrictModel

__all__ = [
    "CONFIG_VERSION",
    "LimitSettings",
    "ListenSettings",
    "LoraSection",
    "RunSettings",
    "SecureAggregationSection",
    "TimeoutSettings",
    "TlsServerSettings",
    "TrainingSection",
    "WorkerEntry",
    "token_digest",
]

CONFIG_VERSION: Final = 1
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def token_digest(token: str) -> str:
    """What the allow-list stores instead of a worker's bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


class LoraSection(StrictModel):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(ALL_PROJECTIONS, min_length=1)


class TrainingSection(StrictModel):
    local_steps: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    max_seq_len: int = Field(256, ge=8)
    grad_clip_norm: float = Field(1.0, gt=0)
    update_clip_norm: float = Field(0.0, ge=0, description="L2 bound on each update; 0 leaves it unbounded")


class WorkerEntry(StrictModel):
    """One admitted institution: its id, the SHA-256 of its bearer token (never the token), and the
    public half of its long-term Ed25519 identity key, which signs its secure-aggregation keys."""

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    identity_public: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class SecureAggregationSection(StrictModel):
    """Bonawitz et al. (CCS 2017) secure aggregation; on unless a run turns it off."""

    enabled: bool = True
    threshold_fraction: float = Field(
        2 / 3, gt=0, le=1, description="Survivors needed, as a fraction of a round's participants (at least 2)"
    )
    clip_range: float = Field(0.05, gt=0, description="Each weighted coordinate is clamped here before quantization")
    bits: int | None = Field(None, ge=2, le=31, description="Quantization bits; by default the most that cannot wrap")
    max_examples: int = Field(65536, ge=1, le=2**20, description="Example counts above this weigh as this")


class TlsServerSettings(StrictModel):
    cert: Path
    key: Path
    client_ca: Path | None = Field(None, description="Require client certificates signed by this CA (mTLS)")


class ListenSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    metrics_port: int | None = Field(9100, ge=0, le=65535, description="None turns metrics off")
    tls: TlsServerSettings | None = None


class TimeoutSettings(StrictModel):
    """Phase deadlines grow with the payload: large models stream for minutes, not seconds."""

    admission_s: float = Field(600.0, gt=0)
    phase_base_s: float = Field(120.0, gt=0)
    phase_s_per_mib: float = Field(2.0, ge=0)
    train_s: float = Field(1800.0, gt=0, description="Local training time allowed on top of streaming")
    poll_wait_ms: int = Field(2000, ge=0, le=60000)

    def phase_deadline(self, payload_bytes: int, *, training: bool) -> timedelta:
        seconds = self.phase_base_s + self.phase_s_per_mib * payload_bytes / 2**20
        return timedelta(seconds=seconds + (self.train_s if training else 0.0))


class LimitSettings(StrictModel):
    chunk_bytes: int = Field(2**20, ge=1024, le=4 * 2**20)
    max_update_bytes: int = Field(8 * 2**30, ge=1)


class RunSettings(BaseSettings):
    """Everything the coordinator decides a run by. Saved with the run as `config_version`."""

    model_config = SettingsConfigDict(env_prefix="FEDLORA_", env_nested_delimiter="__", extra="forbid")

    config_version: Literal[1] = CONFIG_VERSION
    run_id: str = Field("fedlora-run", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    base_model: str = Field(min_length=1, description="Hub id or path the workers load (informational here)")
    mode: Literal["lora", "qlora", "full"] = "lora"
    aggregation: Literal["fedavg", "ffa"] = "fedavg"
    lora: LoraSection = LoraSection()
    training: TrainingSection = TrainingSection()
    rounds: int = Field(3, ge=1)
    min_workers: int = Field(2, ge=1)
    workers: tuple[WorkerEntry, ...] = Field(min_length=1)
    seed: int = Field(0, ge=0)
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    state_dir: Path = Path("state")
    listen: ListenSettings = ListenSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        if self.mode == "full" and self.aggregation == "ffa":
            raise ValueError("aggregation: ffa applies to LoRA adapters, not to mode full")
        if self.min_workers > len(self.workers):
            raise ValueError(f"min_workers: {self.min_workers} exceeds the {len(self.workers)} allowed workers")
        ids = [w.id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError("workers: worker ids must be unique")
        if self.secure_aggregation.enabled:
            missing = [w.id for w in self.workers if w.identity_public is None]
            if missing:
                raise ValueError(
                    f"workers: secure aggregation needs identity_public for {', '.join(missing)} "
                    "(fedlora-worker keygen), or secure_aggregation.enabled: false"
                )
            if self.min_workers < 2:
                raise ValueError("min_workers: secure aggregation needs at least 2 workers")
        return self
