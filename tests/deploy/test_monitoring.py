"""The shipped monitoring files: promtool accepts them, the alerts fire as their tests say, and every
metric the dashboard and the alerts query is one the coordinator or a worker actually exposes."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from fedlora_server.metrics import DoorMetrics, ServerMetrics
from fedlora_worker.metrics import WorkerMetrics
from tests.deploy.prometheus import tool
from tests.deploy.support import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedlora.json"
METRIC = re.compile(r"\bfedlora_[a-zA-Z0-9_]+\b")
RECORDED = re.compile(r"\bfedlora:[a-zA-Z0-9_:]+")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False)


def exposed() -> set[str]:
    """Every series name the programs' registries expose (the coordinator's run and door metrics, a
    worker's), with the suffixes Prometheus sees, and the gauges issue 18 adds to the coordinator."""
    registry = CollectorRegistry()
    ServerMetrics(registry)
    DoorMetrics(registry)
    WorkerMetrics(registry)
    names = {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}
    return names


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: panel targets' expr and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def test_promtool_accepts_the_shipped_prometheus_config_and_its_rules() -> None:
    config = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    rules = _promtool("check", "rules", str(DEPLOY / "alerts.yml"))

    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "10 rules found" in rules.stdout


def test_the_alerts_fire_when_and_only_when_their_unit_tests_say() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=REPO / "tests" / "deploy",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    named = {name for query in _queries(dashboard) for name in METRIC.findall(query)}

    assert len(named) >= 15
    assert named - exposed() == set()


def test_the_alert_rules_query_only_metrics_that_exist_or_that_they_record() -> None:
    rules = [rule for group in _rules()["groups"] for rule in group["rules"]]

    named = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    recorded_named = {name for rule in rules for name in RECORDED.findall(rule["expr"])}
    recorded = {rule["record"] for rule in rules if "record" in rule}

    assert {"fedlora_door_refused_total", "fedlora_run_finished", "fedlora_run_failed"} <= named
    assert named - exposed() == set()
    assert recorded_named - recorded == set()


def _rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "alerts.yml").read_text(encoding="utf-8"))
    return loaded


def test_the_metric_name_check_would_catch_a_renamed_metric() -> None:
    assert "fedlora_worker_dp_epsilon" in exposed()
    assert "fedlora_worker_epsilon" not in exposed()
    assert "fedlora_round_phase_seconds_bucket" in exposed()
    assert "fedlora_rounds_completed_total" in exposed()
    assert "fedlora_door_refused_total" in exposed()


@pytest.mark.parametrize("service", ["coordinator", "worker-clinical", "worker-legal", "worker-finance"])
def test_prometheus_scrapes_each_compose_service_on_the_port_it_serves_metrics_on(service: str) -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    template = "run.yaml" if service == "coordinator" else f"{service}.yaml"
    config = yaml.safe_load((DEPLOY / "compose" / template).read_text(encoding="utf-8"))

    targets = {t for job in scrape["scrape_configs"] for s in job["static_configs"] for t in s["targets"]}
    port = config["listen"]["metrics_port"] if service == "coordinator" else config["metrics_port"]

    assert f"{service}:{port}" in targets
    assert str(port) in compose["services"][service]["expose"]
