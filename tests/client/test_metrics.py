"""What a site's metrics endpoint serves: every series names the site, whatever scrapes it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedlora_worker.metrics import WorkerMetrics, labelled


def test_every_series_the_endpoint_serves_carries_the_worker_label_beside_its_own() -> None:
    # Prepare: the daemon's metrics, with a counter, a gauge and a series that has a label of its own.
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.training_steps.inc(3)
    metrics.train_loss.set(2.5)
    metrics.memorization_exact.labels(group="10x").set(0.25)

    # Execute: what `GET /metrics` would answer.
    page = generate_latest(labelled(registry, worker="clinical")).decode()

    # Assert: every sample names the site; values and own labels are kept; the daemon's registry is untouched.
    samples = [s for family in text_string_to_metric_families(page) for s in family.samples]
    assert len(samples) >= 14
    assert all(s.labels.get("worker") == "clinical" for s in samples)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert values[("fedlora_worker_training_steps_total", (("worker", "clinical"),))] == 3
    assert values[("fedlora_worker_train_loss", (("worker", "clinical"),))] == 2.5
    assert values[("fedlora_worker_memorization_exact_match_rate", (("group", "10x"), ("worker", "clinical")))] == 0.25
    assert registry.get_sample_value("fedlora_worker_training_steps_total") == 3
