"""How the shipped deployments end (issue 18): the programs run to the end of a run and say how it ended
by their exit code, 0 finished (or stopped by a signal), 1 failed / the site cannot go on, 2 refused. No
compose service or Kubernetes Job starts a program again after 0, or more than a few times after 2; a
crash or a killed pod gets a few more tries. Both files still validate against their schemas
(test_compose.py, test_kubernetes.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import containers, job_outcome, jobs, pod_spec
from tests.deploy.support import REPO

REFUSED, FINISHED, FAILED, KILLED = 2, 0, 1, 137
MOST_TRIES = 3
"""The most times anything is started again after one failure: a refusal stops within seconds."""
PROGRAMS = {"fedlora-server", "fedlora-worker"}


def _services() -> dict[str, dict[str, Any]]:
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def docker_restarts(policy: str, exit_code: int) -> float:
    """How many times Docker starts a container again that exits with `exit_code` every time, under a
    compose `restart:` policy (math.inf: for ever). `no` never; `always` and `unless-stopped` after any
    exit; `on-failure[:N]` after a non-zero exit only, at most N times (without N: for ever)."""
    if policy == "no":
        return 0
    if policy in ("always", "unless-stopped"):
        return math.inf
    kind, _, most = policy.partition(":")
    if kind != "on-failure":
        raise ValueError(f"not a compose restart policy: {policy!r}")
    if exit_code == 0:
        return 0
    return int(most) if most else math.inf


def _policy(service: dict[str, Any]) -> str:
    assert "restart_policy" not in service.get("deploy", {}), "deploy.restart_policy: use `restart:`"
    policy: str = service.get("restart", "no")
    return policy


def _runs_a_program(service: dict[str, Any]) -> bool:
    return service.get("image", "").split(":")[0] in PROGRAMS and "entrypoint" not in service


def test_the_restart_model_reads_the_policies_that_looped_as_looping() -> None:
    assert docker_restarts("on-failure", REFUSED) == math.inf
    assert docker_restarts("unless-stopped", FINISHED) == math.inf
    assert docker_restarts("always", FINISHED) == math.inf
    assert docker_restarts("on-failure:3", FINISHED) == 0
    assert docker_restarts("on-failure:3", REFUSED) == 3
    with pytest.raises(ValueError, match="not a compose restart policy"):
        docker_restarts("sometimes", REFUSED)


@pytest.mark.parametrize("name", sorted(_services()))
def test_no_compose_service_starts_again_after_a_finished_run_or_keeps_retrying_a_refusal(name: str) -> None:
    policy = _policy(_services()[name])

    after_finish = docker_restarts(policy, FINISHED)
    after_refusal = docker_restarts(policy, REFUSED)

    assert after_finish == 0
    assert after_refusal <= MOST_TRIES


def test_compose_gives_the_coordinator_and_every_worker_a_few_tries_after_a_crash() -> None:
    programs = {name: service for name, service in _services().items() if _runs_a_program(service)}

    tries = {
        name: (docker_restarts(_policy(s), FAILED), docker_restarts(_policy(s), KILLED)) for name, s in programs.items()
    }

    assert set(programs) == {"coordinator", "worker-clinical", "worker-legal", "worker-finance"}
    assert all(1 <= n <= MOST_TRIES for pair in tries.values() for n in pair), tries


def _job(manifest: str) -> dict[str, Any]:
    return next(job for name, job in jobs() if name == manifest)


def _main_container(job: dict[str, Any]) -> str:
    (main,) = pod_spec(job)["containers"]
    name: str = main["name"]
    return name


def test_each_program_runs_as_a_job_of_one_pod_that_is_never_restarted_in_place() -> None:
    found = {name: job for name, job in jobs()}

    assert set(found) == {"coordinator.yaml", "worker.yaml"}
    for job in found.values():
        spec = job["spec"]
        assert pod_spec(job)["restartPolicy"] == "Never"
        assert (spec["completions"], spec["parallelism"]) == (1, 1)
        assert spec["podReplacementPolicy"] == "Failed"  # never two pods on one state or data volume
        assert spec.get("ttlSecondsAfterFinished", math.inf) >= 7 * 24 * 3600  # its logs stay to be read
        assert 1 <= spec["backoffLimit"] <= MOST_TRIES


@pytest.mark.parametrize(
    ("manifest", "container"), [(name, c["name"]) for name, job in jobs() for c in containers(job)]
)
def test_exit_code_2_of_any_container_fails_the_job_at_once(manifest: str, container: str) -> None:
    assert job_outcome(_job(manifest), {container: REFUSED}) == "fail_job"


@pytest.mark.parametrize("manifest", ["coordinator.yaml", "worker.yaml"])
def test_a_finished_run_completes_the_job(manifest: str) -> None:
    job = _job(manifest)

    outcome = job_outcome(job, {c["name"]: FINISHED for c in containers(job)})

    assert outcome == "complete"


@pytest.mark.parametrize("manifest", ["coordinator.yaml", "worker.yaml"])
def test_a_killed_pod_is_tried_again_and_a_disrupted_one_without_counting_it(manifest: str) -> None:
    job = _job(manifest)
    main = _main_container(job)

    killed = job_outcome(job, {main: KILLED})
    drained = job_outcome(job, {main: KILLED}, frozenset({"DisruptionTarget"}))

    assert killed == "count"
    assert drained == "ignore"


def test_a_worker_that_could_not_go_on_is_tried_again_but_a_failed_run_is_not() -> None:
    worker = job_outcome(_job("worker.yaml"), {"worker": FAILED})
    coordinator = job_outcome(_job("coordinator.yaml"), {"coordinator": FAILED})

    assert worker == "count"
    assert coordinator == "fail_job"  # its state says failed: a new pod would exit 1 again


@pytest.mark.parametrize("manifest", ["coordinator.yaml", "worker.yaml"])
def test_the_pod_failure_policy_passes_the_checks_the_api_server_makes_beyond_the_schema(manifest: str) -> None:
    job = _job(manifest)
    names = {c["name"] for c in containers(job)}

    rules = job["spec"]["podFailurePolicy"]["rules"]

    assert len(rules) <= 20
    for rule in rules:
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule)
        codes = rule.get("onExitCodes")
        if codes is not None:
            assert codes["values"] == sorted(set(codes["values"]))
            assert codes["operator"] != "In" or 0 not in codes["values"]
            assert codes.get("containerName") in (None, *names)


@pytest.mark.parametrize("manifest", ["coordinator.yaml", "worker.yaml"])
def test_no_probe_can_stop_a_program_in_the_middle_of_its_work(manifest: str) -> None:
    """The kubelet stops a container that fails a liveness or startup probe (SIGTERM); a coordinator busy with a
    long commit, or a worker loading a large base, would be stopped and its pod replaced for nothing. Readiness
    alone keeps workers away from a coordinator that cannot serve."""
    probes = [(c["name"], p) for c in containers(_job(manifest)) for p in ("livenessProbe", "startupProbe") if p in c]

    assert probes == []
