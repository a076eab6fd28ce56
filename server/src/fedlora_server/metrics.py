"""The coordinator's Prometheus metrics, registered on a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DoorMetrics", "ServerMetrics"]

PHASE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds_started = Counter(
            "fedlora_rounds_started_total", "Training rounds started (attempts)", registry=registry
        )
        self.rounds_completed = Counter(
            "fedlora_rounds_completed_total", "Rounds committed and evaluated", registry=registry
        )
        self.rounds_failed = Counter(
            "fedlora_rounds_failed_total", "Round attempts that failed and were retried", registry=registry
        )
        self.phase_seconds = Histogram(
            "fedlora_round_phase_seconds",
            "Wall time of each round phase",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.workers_connected = Gauge("fedlora_workers_connected", "Workers admitted to the run", registry=registry)
        self.workers_left = Counter(
            "fedlora_workers_left_total", "Workers that left the run saying they could not go on", registry=registry
        )
        self.current_round = Gauge("fedlora_current_round", "Round in progress", registry=registry)
        self.run_finished = Gauge(
            "fedlora_run_finished",
            "1 once the run has committed all its rounds (it is over, as planned), else 0",
            registry=registry,
        )
        self.run_failed = Gauge(
            "fedlora_run_failed",
            "1 once the run has failed (its last committed round stands; `fedlora-server retry` resumes it), else 0",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "fedlora_tls_certificate_expiry_timestamp_seconds",
            "When the coordinator's TLS certificate (certificate=server) and the CA it checks workers against "
            "(certificate=client_ca) stop being valid, Unix time",
            ["certificate"],
            registry=registry,
        )
        self.round_attempt = Gauge(
            "fedlora_round_attempt",
            "Attempt of the round in progress (above 1: the round is being retried, fedlora_round_backoff shows "
            "whether it is waiting to)",
            registry=registry,
        )
        self.round_backoff = Gauge(
            "fedlora_round_backoff",
            "1 while a failed round waits before its next attempt, else 0",
            registry=registry,
        )
        self.received_bytes = Counter(
            "fedlora_received_bytes_total",
            "Bytes of uploads taken (verified and accepted): one copy of each update, however often it was resent",
            registry=registry,
        )
        self.sent_bytes = Counter("fedlora_sent_bytes_total", "Model bytes sent", registry=registry)
        self.received_chunks = Counter(
            "fedlora_received_chunks_total", "Chunks of uploads taken (verified and accepted)", registry=registry
        )
        self.discarded_bytes = Counter(
            "fedlora_discarded_bytes_total",
            "Bytes of upload streams refused or cut off before their end (a resend brings them again)",
            registry=registry,
        )
        self.sent_chunks = Counter("fedlora_sent_chunks_total", "Model chunks sent", registry=registry)
        self.aggregation_seconds = Histogram(
            "fedlora_aggregation_seconds",
            "Time to fold an update in, or to finish a round's aggregate",
            ["step"],
            registry=registry,
        )
        self.rejected_uploads = Counter(
            "fedlora_rejected_uploads_total", "Uploads refused, by reason", ["reason"], registry=registry
        )
        self.excluded_workers = Counter(
            "fedlora_excluded_workers_total",
            "Workers a failed round attempt showed to be at fault (bad shares, input that broke it); "
            "they sit out the rest of the round",
            registry=registry,
        )
        self.secagg_dropouts = Counter(
            "fedlora_secagg_dropouts_total",
            "Workers lost in each secure-aggregation stage",
            ["stage"],
            registry=registry,
        )
        self.secagg_stage_seconds = Histogram(
            "fedlora_secagg_stage_seconds",
            "Wall time of each secure-aggregation stage",
            ["stage"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.secagg_bytes = Counter(
            "fedlora_secagg_bytes_total",
            "Bytes received in each secure-aggregation stage",
            ["stage"],
            registry=registry,
        )
        self.train_loss = Gauge("fedlora_train_loss", "Example-weighted training loss", registry=registry)
        self.eval_loss = Gauge("fedlora_eval_loss", "Token-weighted held-out loss", registry=registry)
        self.dp_epsilon = Gauge(
            "fedlora_dp_epsilon",
            "Privacy spent so far at the run's delta: client level (DP-FedAvg) or record level (largest site)",
            ["level"],
            registry=registry,
        )
        self.memorization_rate = Gauge(
            "fedlora_memorization_rate",
            "Canary audit of the latest global model over all sites, by duplication group",
            ["group", "metric"],
            registry=registry,
        )


class DoorMetrics:
    """What the coordinator turned away before reading it; apart from ServerMetrics since the door is built
    when the server starts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "fedlora_door_refused_total",
            "Calls refused or cut off before their request was read, by reason: unauthenticated, "
            "worker_limit (one worker's calls in flight), workers_busy, health_busy, read_deadline",
            ["reason"],
            registry=registry,
        )
