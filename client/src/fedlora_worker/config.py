"""The worker's configuration (`worker.yaml`): who it is, where the coordinator is, its data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedlora_common.settings import StrictModel

__all__ = ["DataSection", "DeviceMap", "RetrySettings", "TlsClientSettings", "WorkerSettings"]

DeviceMap = Literal["device", "auto"]
"""device: the whole model on `device`; auto: the base spread over GPUs (accelerate's device_map="auto")."""


class DataSection(StrictModel):
    """This site's records (.jsonl, .json, .csv or .parquet; `text`, `prompt`/`completion` or chat `messages`)."""

    train: tuple[Path, ...] = Field(min_length=1, description="Training records; they never leave the site")
    eval: tuple[Path, ...] = Field((), description="Held-out records each new global model is evaluated on")
    canaries: tuple[Path, ...] = Field(
        (), description="Canary and control records (jsonl) this site audits each new global model with"
    )


class TlsClientSettings(StrictModel):
    """TLS to the coordinator; with cert and key, mutual TLS (the certificate's CN must be worker_id)."""

    ca: Path = Field(description="CA certificate (PEM) the coordinator's certificate must be signed by")
    cert: Path | None = Field(None, description="Client certificate for mutual TLS")
    key: Path | None = Field(None, description="Private key of the client certificate (PEM)")
    server_name: str | None = Field(None, description="Override the name checked in the server certificate")


class SiteLoraSection(StrictModel):
    """What this site's hardware allows of the run's adapter."""

    max_rank: int | None = Field(
        None,
        ge=1,
        description=(
            "The most LoRA rank this site trains; in a run with aggregation hetlora it trains the leading "
            "min(max_rank, lora.rank) ranks of the global adapter. Absent: the run's rank"
        ),
    )


class RetrySettings(StrictModel):
    """How calls to the coordinator are retried after a transient failure (exponential backoff)."""

    attempts: int = Field(8, ge=1, description="Tries per call before the worker gives up on it")
    initial_backoff_s: float = Field(0.5, gt=0, description="Wait before the first retry; doubled each time")
    max_backoff_s: float = Field(30.0, gt=0, description="Longest wait between two tries")
    tls_failures: int = Field(
        3,
        ge=1,
        description="The same TLS failure (a name, CA, key or certificate the handshake refuses) this many times in "
        "a row, and the worker exits 2 naming it instead of retrying; a network loss is retried as ever",
    )


class WorkerSettings(BaseSettings):
    """Everything one data holder needs to take part in a run; the records never leave the site."""

    model_config = SettingsConfigDict(env_prefix="FEDLORA_", env_nested_delimiter="__", extra="forbid")

    config_version: Literal[1] = Field(1, description="Version of this file's format")
    worker_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This site's id, as on the run's allow-list (workers[].id)",
    )
    token: SecretStr | None = Field(None, description="Bearer token (prefer token_file; set exactly one)")
    token_file: Path | None = Field(
        None, description="File holding the bearer token, whose SHA-256 is on the allow-list"
    )
    coordinator: str = Field("127.0.0.1:50051", min_length=3, description="host:port of the coordinator's gRPC port")
    tls: TlsClientSettings | None = Field(None, description="TLS to the coordinator; absent means plaintext")
    base_model: str = Field(min_length=1, description="Local path (or hub id) of the run's base model")
    data: DataSection = Field(description="This site's records")
    device: str = Field(
        "cpu",
        description=(
            "torch device to train on: cpu, cuda, cuda:1, ...; under torchrun, cuda is each process's LOCAL_RANK GPU"
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "The base model's dtype (qlora: its compute dtype); auto: bfloat16 for lora and qlora on a CUDA GPU "
            "that supports it, float32 otherwise (and for full fine-tuning)"
        ),
    )
    base_precision: Literal["auto", "nf4", "bfloat16", "float32"] = Field(
        "auto",
        description=(
            "How this site loads the frozen base: nf4 (4-bit QLoRA, computing in `dtype`), bfloat16 or float32, "
            "within what the run allows (run.yaml base_precisions); auto: as the run's mode says (qlora: nf4) "
            "in `dtype`"
        ),
    )
    lora: SiteLoraSection = Field(SiteLoraSection(), description="This site's share of the run's LoRA adapter")
    device_map: DeviceMap = Field(
        "device",
        description=(
            "device: the whole model on `device`; auto: a base larger than one GPU spread over the GPUs "
            "(accelerate's device_map=auto; under torchrun, over each process's equal share of the node's GPUs)"
        ),
    )
    max_memory_per_gpu: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?\s*(GiB|GB|MiB|MB)$",
        description=(
            "With device_map auto: place at most this much of the base on each GPU (e.g. 60GiB), leaving room "
            "for activations; absent: each GPU's free memory"
        ),
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; by default torch's choice")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics on this port (0 picks one); absent: none"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the metrics endpoint listens on: loopback by default; 0.0.0.0 (or the host's address) "
        "when Prometheus scrapes from another host or container. Every series carries a worker label (worker_id)",
    )
    metrics_linger_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Once this site's part in the run is over (the run finished, or it ended without this site), "
        "keep serving metrics this long before exiting (a signal cuts it short), so that Prometheus scrapes its last round's counters: about two scrape "
        "intervals",
    )
    retry: RetrySettings = Field(RetrySettings(), description="Retries of calls to the coordinator")
    progress: bool = Field(
        True, description="Progress bars while stderr is a terminal (never in a redirected log); false turns them off"
    )
    identity_key: Path | None = Field(
        None, description="File holding this site's Ed25519 identity key (hex), from `fedlora-worker keygen`"
    )
    peers: dict[str, str] = Field(
        default_factory=dict,
        description="The consortium's allow-list: worker id -> identity public key (hex); how peers' keys are checked",
    )

    @field_validator("peers")
    @classmethod
    def _hex_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for worker, key in value.items():
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ValueError(f"the identity key of {worker} must be 64 lowercase hex characters")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> WorkerSettings:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("token: set exactly one of token or token_file")
        return self

    def identity_private(self) -> bytes | None:
        if self.identity_key is None:
            return None
        return bytes.fromhex(self.identity_key.read_text(encoding="utf-8").strip())

    def bearer_token(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        assert self.token_file is not None
        return self.token_file.read_text(encoding="utf-8").strip()
