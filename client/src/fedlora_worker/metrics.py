"""The worker's Prometheus metrics, registered on a registry the caller owns."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["WorkerMetrics", "labelled"]


class _Labelled(Collector):
    """Every sample of `registry`, with `labels` added: the site names itself, whatever scrapes it."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            for sample in metric.samples:
                out.add_sample(sample.name, {**sample.labels, **self._labels}, sample.value, sample.timestamp)
            yield out


def labelled(registry: CollectorRegistry, *, worker: str) -> CollectorRegistry:
    """What the metrics endpoint serves: `registry`'s series, each with worker=<worker_id>, so per-site panels and
    alerts need no label from the scrape configuration (Kubernetes annotations give none)."""
    exposed = CollectorRegistry(auto_describe=True)
    exposed.register(_Labelled(registry, {"worker": worker}))
    return exposed


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.train_loss = Gauge(
            "fedlora_worker_train_loss", "Mean local training loss of the last round", registry=registry
        )
        self.eval_loss = Gauge(
            "fedlora_worker_eval_loss", "Held-out loss of the last evaluated version", registry=registry
        )
        self.tokens_per_second = Gauge(
            "fedlora_worker_tokens_per_second", "Training throughput of the last round", registry=registry
        )
        self.training_steps = Counter("fedlora_worker_training_steps_total", "Optimizer steps", registry=registry)
        self.training_tokens = Counter(
            "fedlora_worker_training_tokens_total",
            "Tokens trained on (padding excluded), over all of this site's processes",
            registry=registry,
        )
        self.gpu_peak_memory = Gauge(
            "fedlora_worker_gpu_peak_memory_bytes",
            "Most GPU memory torch had allocated at once while training the last round (largest over the site's GPUs)",
            registry=registry,
        )
        self.uploaded_bytes = Counter("fedlora_worker_uploaded_bytes_total", "Update bytes sent", registry=registry)
        self.downloaded_bytes = Counter(
            "fedlora_worker_downloaded_bytes_total", "Global model bytes received", registry=registry
        )
        self.rounds = Counter("fedlora_worker_rounds_total", "Rounds this worker trained", registry=registry)
        self.retries = Counter(
            "fedlora_worker_retries_total", "Calls retried after a transient failure", registry=registry
        )
        self.tls_failures = Counter(
            "fedlora_worker_tls_failures_total",
            "Calls that failed because TLS could not be established for a reason of configuration (name, CA, key, "
            "dates, a refused certificate)",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "fedlora_worker_tls_certificate_expiry_timestamp_seconds",
            "When this site's client certificate (certificate=client) and the CA it trusts (certificate=ca) stop "
            "being valid, Unix time",
            ["certificate"],
            registry=registry,
        )
        self.dp_epsilon = Gauge(
            "fedlora_worker_dp_epsilon",
            "Record-level epsilon this site has spent (DP-SGD), at the run's delta",
            registry=registry,
        )
        self.memorization_exact = Gauge(
            "fedlora_worker_memorization_exact_match_rate",
            "Exact-match rate of this site's canaries in the latest audited global model, by duplication group",
            ["group"],
            registry=registry,
        )
