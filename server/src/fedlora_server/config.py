"""The coordinator's run configuration (`run.yaml`), validated before anything starts."""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedlora_common.plans import (
    Aggregation,
    AuditPlan,
    BasePrecision,
    GoldfishPlan,
    LoraSpec,
    Mode,
    RecordDPPlan,
    RunSpec,
    TrainingPlan,
    TrainingSettings,
)
from fedlora_common.settings import StrictModel

__all__ = [
    "CONFIG_VERSION",
    "AuditSection",
    "ClientDPSection",
    "LimitSettings",
    "ListenSettings",
    "PrivacySection",
    "RunSettings",
    "SecureAggregationSection",
    "ServerOptimizerSection",
    "TimeoutSettings",
    "TlsServerSettings",
    "WorkerEntry",
    "token_digest",
]

CONFIG_VERSION: Final = 1


def token_digest(token: str) -> str:
    """What the allow-list stores instead of a worker's bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


class WorkerEntry(StrictModel):
    """One admitted institution: its id, the SHA-256 of its bearer token (never the token), and the
    public half of its long-term Ed25519 identity key, which signs its secure-aggregation keys."""

    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="The worker's id: its worker.yaml worker_id, and the CN of its client certificate under mTLS",
    )
    token_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the worker's bearer token file, as `sha256sum` prints it (a trailing newline "
        "in the file is allowed: the worker sends the token without it)",
    )
    identity_public: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Public half of the worker's Ed25519 identity key, as `fedlora-worker keygen` prints it; "
        "required while secure aggregation is on",
    )


class SecureAggregationSection(StrictModel):
    """Bonawitz et al. (CCS 2017) secure aggregation; on unless a run turns it off."""

    enabled: bool = Field(
        True, description="Mask every update so the coordinator learns only the sum; needs identity_public per worker"
    )
    threshold_fraction: float = Field(
        2 / 3, gt=0, le=1, description="Survivors needed, as a fraction of a round's participants (at least 2)"
    )
    clip_range: float = Field(0.05, gt=0, description="Each weighted coordinate is clamped here before quantization")
    bits: int | None = Field(None, ge=2, le=31, description="Quantization bits; by default the most that cannot wrap")


class ServerOptimizerSection(StrictModel):
    """What the coordinator does with the round's mean update (Reddi et al. 2021, "Adaptive Federated
    Optimization"): none adds it to the global model as FedAvg does; fedavgm, fedadam and fedyogi treat it as a
    pseudo-gradient for a server-side optimizer whose state lives with the run's versions."""

    name: Literal["none", "fedavgm", "fedadam", "fedyogi"] = Field(
        "none", description="none: global += mean update (FedAvg); fedavgm: with momentum; fedadam, fedyogi: adaptive"
    )
    lr: float = Field(1.0, gt=0, description="Server learning rate (eta): the step taken along the (adapted) mean")
    beta1: float = Field(0.9, ge=0, lt=1, description="Momentum of the mean update (fedavgm's momentum)")
    beta2: float = Field(0.99, ge=0, lt=1, description="Decay of the second moment (fedadam, fedyogi)")
    tau: float = Field(1e-3, gt=0, description="Adaptivity: added to the second moment's root (fedadam, fedyogi)")


class ClientDPSection(StrictModel):
    """Client-level DP-FedAvg (McMahan et al. 2018): updates clipped to clip_norm, Gaussian-like noise.

    Set noise_multiplier, or target_epsilon for the coordinator to solve for it over all rounds.
    placement: distributed (each worker adds Skellam noise before masking; needs secure
    aggregation, and is its default) or central (the coordinator adds Gaussian noise to the sum it
    sees in the clear: this trusts the coordinator, and is refused with secure aggregation on).
    """

    clip_norm: float = Field(gt=0, description="L2 bound on each update; noise needs it")
    noise_multiplier: float | None = Field(None, gt=0, description="Noise std as a multiple of clip_norm (z)")
    target_epsilon: float | None = Field(
        None, gt=0, description="Epsilon to reach after all rounds; the coordinator solves z for it before round 1"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta the client-level epsilon is stated at")
    placement: Literal["distributed", "central"] | None = Field(
        None,
        description="Who adds the noise: distributed (each worker, under secure aggregation; its default) "
        "or central (the coordinator, only with secure aggregation off)",
    )
    epsilon_budget: float | None = Field(None, gt=0, description="Stop before a round would spend more")

    @model_validator(mode="before")
    @classmethod
    def _clipped(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("clip_norm") is None:
            raise ValueError("noise without clipping bounds nothing: set clip_norm > 0")
        return data

    @model_validator(mode="after")
    def _noise(self) -> ClientDPSection:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self


class PrivacySection(StrictModel):
    """Each part is off unless present."""

    client_dp: ClientDPSection | None = None
    record_dp: RecordDPPlan | None = None
    goldfish: GoldfishPlan | None = None


class AuditSection(AuditPlan):
    """The canary audit each worker runs on a new global model; only aggregate rates leave a site."""

    every: int = Field(1, ge=1, description="Audit after every N-th round (and always after the last)")

    def plan(self) -> AuditPlan:
        """What the workers are sent: the audit without the coordinator's schedule."""
        return AuditPlan.model_validate(self.model_dump(exclude={"every"}))


class TlsServerSettings(StrictModel):
    """TLS on the coordinator's gRPC port (`fedlora-server certs` makes a CA and the certificates)."""

    cert: Path = Field(description="Server certificate (PEM); its SANs must name the address workers dial")
    key: Path = Field(description="Private key of the server certificate (PEM)")
    client_ca: Path | None = Field(None, description="Require client certificates signed by this CA (mTLS)")


class ListenSettings(StrictModel):
    """Where the coordinator serves gRPC and metrics, and how."""

    host: str = Field("127.0.0.1", description="Address to listen on; anything but loopback needs tls or insecure")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    metrics_port: int | None = Field(9100, ge=0, le=65535, description="None turns metrics off")
    metrics_linger_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Once the run is over, keep serving metrics this long before exiting, so that Prometheus "
        "scrapes its final state (fedlora_run_finished/failed): about two scrape intervals",
    )
    tls: TlsServerSettings | None = Field(None, description="Serve TLS (and mTLS with client_ca)")
    insecure: bool = Field(
        False, description="Allow plaintext gRPC on a non-loopback address (bearer tokens then cross the network)"
    )

    @model_validator(mode="after")
    def _no_plaintext_off_loopback(self) -> ListenSettings:
        if self.tls is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"listen: plaintext gRPC on {self.host} would send bearer tokens and updates in the clear; "
                "set listen.tls, or listen.insecure: true on a network you trust"
            )
        return self

    @property
    def plaintext_off_loopback(self) -> bool:
        return self.tls is None and not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TimeoutSettings(StrictModel):
    """Phase deadlines grow with the payload: large models stream for minutes, not seconds."""

    admission_s: float = Field(600.0, gt=0, description="How long the run waits for min_workers to join")
    phase_base_s: float = Field(120.0, gt=0, description="Every phase's deadline before payload time is added")
    phase_s_per_mib: float = Field(2.0, ge=0, description="Seconds added to a phase's deadline per MiB it streams")
    train_s: float = Field(1800.0, gt=0, description="Local training time allowed on top of streaming")
    retry_backoff_s: float = Field(
        1.0,
        ge=0,
        description="A failed round attempt is retried at once the first time, then after this long, "
        "doubling with each further failure of the same round",
    )
    retry_backoff_max_s: float = Field(60.0, ge=0, description="The longest wait between two attempts of a round")
    attempts_per_round: int = Field(
        10, ge=1, description="Attempts a round may take; when the last fails too, the run fails with its reason"
    )
    poll_wait_ms: int = Field(
        2000, ge=0, le=60000, description="How long a worker's poll is held open waiting for a task (long polling)"
    )

    def retry_delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the `failed_attempts`-th failure of one round before its next attempt."""
        if failed_attempts <= 1:
            return 0.0
        return float(min(self.retry_backoff_s * 2 ** (failed_attempts - 2), self.retry_backoff_max_s))

    def phase_deadline(self, payload_bytes: int, *, training: bool) -> timedelta:
        seconds = self.phase_base_s + self.phase_s_per_mib * payload_bytes / 2**20
        return timedelta(seconds=seconds + (self.train_s if training else 0.0))


class LimitSettings(StrictModel):
    """Sizes the coordinator accepts, how much it buffers per stream, and the calls of each class it holds at once."""

    chunk_bytes: int = Field(2**20, ge=1024, le=4 * 2**20, description="Largest chunk of a streamed upload")
    max_update_bytes: int = Field(8 * 2**30, ge=1, description="Largest upload a worker may declare")
    max_streams: int = Field(64, ge=1, le=4096, description="Uploads and downloads open at once, all workers together")
    max_streams_per_worker: int = Field(2, ge=1, description="Uploads and downloads one worker may hold open at once")
    stream_idle_s: float = Field(60.0, gt=0, description="A stream with no message for this long is cancelled")
    stream_min_bytes_per_s: float = Field(
        256 * 1024.0,
        gt=0,
        description="Slowest accepted transfer: a stream may take stream_idle_s plus its declared size at this rate",
    )
    max_worker_calls: int = Field(
        128,
        ge=2,
        le=4096,
        description=(
            "Calls of allowed workers in flight at once, all together, uploads and downloads included: the server "
            "threads reserved for workers. More than max_streams, so that polls go on while every stream is held"
        ),
    )
    max_calls_per_worker: int = Field(
        8,
        ge=2,
        description=(
            "Calls one worker may have in flight at once, streams included (a worker makes one at a time; more "
            "are calls it gave up on that the coordinator has not yet ended); beyond it RESOURCE_EXHAUSTED, retried"
        ),
    )
    max_health_calls: int = Field(
        8,
        ge=1,
        le=256,
        description="gRPC health checks in flight at once (open to anyone): the threads reserved for them",
    )
    refusal_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads that answer calls refused at the door (no valid token, or over a budget) without reading them",
    )
    max_calls_per_connection: int = Field(
        32,
        ge=1,
        le=2**31 - 1,
        description=(
            "Calls in flight on one connection (HTTP/2 max_concurrent_streams); a worker needs a few. Raise it "
            "behind a proxy that carries many workers on one connection"
        ),
    )
    request_read_s: float = Field(
        10.0,
        gt=0,
        description=(
            "A call whose request message (every call but an upload, health checks included) has not fully "
            "arrived this long after the call opened is cancelled; an upload's messages have stream_idle_s each"
        ),
    )
    stream_window_bytes: int | None = Field(
        None,
        ge=65_535,
        le=2**31 - 1,
        description=(
            "HTTP/2 receive window per stream. None lets gRPC size it from the measured bandwidth-delay product "
            "(fastest, but memory grows with concurrent uploads); a fixed window caps memory at about workers x "
            "window: size it to the link, bandwidth x round-trip time (1 Gbit/s x 50 ms is about 6 MB)"
        ),
    )

    @model_validator(mode="after")
    def _room_beside_streams(self) -> LimitSettings:
        if self.max_worker_calls <= self.max_streams:
            raise ValueError(
                f"max_worker_calls: {self.max_worker_calls} must exceed max_streams ({self.max_streams}), "
                "or workers holding every stream would leave no room for a poll"
            )
        if self.max_calls_per_worker <= self.max_streams_per_worker:
            raise ValueError(
                f"max_calls_per_worker: {self.max_calls_per_worker} must exceed max_streams_per_worker "
                f"({self.max_streams_per_worker}), or a worker holding its streams could not poll"
            )
        return self

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the coordinator's gRPC server for these limits."""
        options = [
            ("grpc.max_receive_message_length", self.chunk_bytes + 2**16),
            ("grpc.max_send_message_length", self.chunk_bytes + 2**20),
            ("grpc.max_concurrent_streams", self.max_calls_per_connection),
            # Count calls as HTTP/2 does (open streams). gRPC's default also counts streams not yet freed, and
            # refuses a client's first calls, sent before our SETTINGS reached it, with REFUSED_STREAM, which
            # its stub reports as UNAVAILABLE; what admitted calls cost is bounded by the door's budgets.
            ("grpc.http.overload_protection", 0),
            # A second coordinator on a port one already serves fails to start; with gRPC's default (SO_REUSEPORT)
            # both would listen and the kernel would share the workers between two runs.
            ("grpc.so_reuseport", 0),
        ]
        if self.stream_window_bytes is not None:
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", self.stream_window_bytes)]
        return options


class RunSettings(BaseSettings):
    """Everything the coordinator decides a run by. Saved with the run as `config_version`."""

    model_config = SettingsConfigDict(env_prefix="FEDLORA_", env_nested_delimiter="__", extra="forbid")

    config_version: Literal[1] = Field(CONFIG_VERSION, description="Version of this file's format")
    run_id: str = Field(
        "fedlora-run",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of the run; a state_dir holding another run is refused",
    )
    base_model: str = Field(min_length=1, description="Hub id or path the workers load (informational here)")
    mode: Mode = Field(
        "lora", description="lora: LoRA on a float base; qlora: LoRA on a 4-bit NF4 base; full: every weight"
    )
    aggregation: Aggregation = Field(
        "fedavg",
        description=(
            "fedavg: A and B averaged separately; ffa: A frozen at the seeded init, only B travels; hetlora: each "
            "site trains the leading ranks its worker.yaml `lora.max_rank` allows (at most lora.rank), and each rank "
            "index is averaged over the sites that trained it"
        ),
    )
    lora: LoraSpec = LoraSpec()
    base_precisions: tuple[BasePrecision, ...] = Field(
        (),
        description=(
            "How sites may load the base (each picks in worker.yaml `base_precision`): nf4 (QLoRA), bfloat16, "
            "float32; empty: the mode's own (lora: bfloat16 or float32; qlora: nf4; full: bfloat16 or float32)"
        ),
    )
    server_optimizer: ServerOptimizerSection = ServerOptimizerSection()
    training: TrainingSettings = TrainingSettings()
    rounds: int = Field(3, ge=1, description="Rounds to commit before the run finishes")
    min_workers: int = Field(
        2, ge=1, description="Workers that must join before the run starts; below it a round fails and is retried"
    )
    workers: tuple[WorkerEntry, ...] = Field(min_length=1, description="The allow-list: who may join")
    seed: int = Field(0, ge=0, description="Seeds the initial adapter and each round's batch order (not DP noise)")
    max_examples: int = Field(
        65536,
        ge=1,
        le=2**20,
        description=(
            "The most examples one update weighs as: a worker's self-reported count is capped here "
            "(plain and secure aggregation alike), so no site can outweigh the rest by claiming more"
        ),
    )
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    privacy: PrivacySection = PrivacySection()
    audit: AuditSection | None = None
    state_dir: Path = Field(
        Path("state"),
        description="Where the coordinator keeps its SQLite state, artifacts and reports; a restart resumes from it",
    )
    listen: ListenSettings = ListenSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        self.run_spec()  # the rules every site checks too (mode and aggregation agree)
        if self.min_workers > len(self.workers):
            raise ValueError(f"min_workers: {self.min_workers} exceeds the {len(self.workers)} allowed workers")
        ids = [w.id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError("workers: worker ids must be unique")
        # What every round's plan must satisfy (TrainingPlan's own rules), checked before the run starts.
        TrainingPlan(**self.training.model_dump(), goldfish=self.privacy.goldfish, record_dp=self.privacy.record_dp)
        if self.secure_aggregation.enabled:
            missing = [w.id for w in self.workers if w.identity_public is None]
            if missing:
                raise ValueError(
                    f"workers: secure aggregation needs identity_public for {', '.join(missing)} "
                    "(fedlora-worker keygen), or secure_aggregation.enabled: false"
                )
            if self.min_workers < 2:
                raise ValueError("min_workers: secure aggregation needs at least 2 workers")
        self._check_client_dp()
        return self

    def _check_client_dp(self) -> None:
        dp = self.privacy.client_dp
        if dp is None:
            return
        secure = self.secure_aggregation.enabled
        if dp.placement == "central" and secure:
            raise ValueError(
                "privacy.client_dp.placement: central noise is added by a coordinator that sees the sum; "
                "with secure aggregation on use distributed"
            )
        if dp.placement == "distributed" and not secure:
            raise ValueError("privacy.client_dp.placement: distributed noise needs secure_aggregation.enabled: true")
        if dp.epsilon_budget is not None and dp.noise_multiplier is not None:
            # Imported here: the accountant pulls in dp-accounting and SciPy, which a config check need not pay for.
            from fedlora_common.privacy import gaussian_epsilon

            first = gaussian_epsilon(dp.noise_multiplier, steps=1, delta=dp.delta)
            if first > dp.epsilon_budget:
                raise ValueError(
                    f"privacy.client_dp.epsilon_budget: {dp.epsilon_budget} is already spent by the first round "
                    f"(epsilon {first:.3g} at noise_multiplier {dp.noise_multiplier})"
                )

    def run_spec(self) -> RunSpec:
        """What every worker is told at admission: the run's fixed settings, validated by RunSpec's own rules."""
        return RunSpec(
            run_id=self.run_id,
            mode=self.mode,
            aggregation=self.aggregation,
            base_model=self.base_model,
            lora=self.lora,
            total_rounds=self.rounds,
            seed=self.seed,
            base_precisions=self.base_precisions,
        )

    @property
    def client_dp_placement(self) -> Literal["distributed", "central"] | None:
        """Where client-level noise is added, defaulting to distributed whenever aggregation is secure."""
        dp = self.privacy.client_dp
        if dp is None:
            return None
        return dp.placement or ("distributed" if self.secure_aggregation.enabled else "central")
