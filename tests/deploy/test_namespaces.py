"""A round across network namespaces: the coordinator and each site on a host of its own, joined only by a
bridge, over mutual TLS with certificates from `fedlora-server certs` naming the coordinator's address.
The example's configs run as shipped for two hosts; only the coordinator's address and the round count
are given as flags."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from fedlora_lab.model_factory import MadeModel
from tests.deploy.example import SITES, prepare_example
from tests.deploy.namespaces import Hosts
from tests.deploy.processes import Processes, listening
from tests.deploy.support import coordinator_command, program_env, worker_command

REACH = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()"


@dataclass(frozen=True)
class SplitRun:
    exit_codes: dict[str, int]
    report: dict[str, Any]
    reaches_coordinator: int
    reaches_own_loopback: int
    namespaces_during: list[str]
    namespaces_after: list[str]


def _connects(hosts: Hosts, name: str, address: str, port: int) -> int:
    probe = [*hosts.exec(name), "python3", "-c", REACH, address, str(port)]
    return subprocess.run(probe, capture_output=True, env=program_env(), timeout=30, check=False).returncode


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, lab_model: MadeModel) -> SplitRun:
    out = tmp_path_factory.mktemp("namespaces")
    hosts = Hosts("coordinator", *SITES)
    prepare_example(out, lab_model, sans=hosts.address("coordinator"))
    with hosts, Processes(out / "logs") as processes:
        during = hosts.exists()
        coordinator = processes.start(
            "coordinator",
            [*coordinator_command("run.yaml"), "--rounds", "1"],
            cwd=out,
            prefix=hosts.exec("coordinator"),
            stdout_pipe=True,
        )
        port = listening(coordinator)["port"]
        reaches = _connects(hosts, "site-a", hosts.address("coordinator"), port)
        loopback = _connects(hosts, "site-a", "127.0.0.1", port)
        for site, (config, _) in SITES.items():
            processes.start(
                site,
                [*worker_command(config), "--coordinator", f"{hosts.address('coordinator')}:{port}"],
                cwd=out,
                prefix=hosts.exec(site),
            )
        codes = processes.wait_all(timeout=420)
    report = json.loads((out / "coordinator-state" / "report.json").read_text(encoding="utf-8"))
    return SplitRun(codes, report, reaches, loopback, during, hosts.exists())


def test_each_program_is_alone_in_its_namespace_and_reaches_the_coordinator_only_over_the_bridge(
    split: SplitRun,
) -> None:
    assert len(split.namespaces_during) == 3
    assert split.reaches_coordinator == 0
    assert split.reaches_own_loopback != 0


def test_a_round_completes_across_namespaces_over_mutual_tls_with_secure_aggregation(split: SplitRun) -> None:
    assert split.exit_codes == {"coordinator": 0, "site-a": 0, "site-b": 0}
    assert split.report["secure_aggregation"] is True
    assert [r["round"] for r in split.report["rounds"]] == [1]
    assert sorted(split.report["rounds"][0]["participants"]) == list(SITES)


def test_the_namespaces_are_gone_afterwards(split: SplitRun) -> None:
    assert split.namespaces_after == []


def _fail_inside(hosts: Hosts, seen: list[str]) -> None:
    with hosts:
        seen += hosts.exists()
        raise RuntimeError("midway")


def test_namespaces_are_removed_when_the_block_fails() -> None:
    hosts = Hosts("one", "two")
    seen: list[str] = []

    with pytest.raises(RuntimeError, match="midway"):
        _fail_inside(hosts, seen)

    assert len(seen) == 2
    assert hosts.exists() == []
