"""The Kubernetes manifests under deploy/k8s as the tests read them, and what the kubelet and the Job
controller do with them where the schemas cannot say: `$(VAR)` in a container's command, and the fate of
a Job's pod from its containers' exit codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import yaml

from tests.deploy.support import REPO

K8S = REPO / "deploy" / "k8s"

Outcome = Literal["complete", "fail_job", "count", "ignore"]
"""What a Job does after one of its pods ended: it completes; it fails at once; it starts another pod,
counting the failure against backoffLimit; or it starts another without counting it."""


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]


def of_kind(name: str, kind: str) -> dict[str, Any]:
    return next(d for d in documents(name) if d["kind"] == kind)


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, d) for path in sorted(K8S.glob("*.yaml")) for d in documents(path.name)]


def jobs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, d in all_documents() if d["kind"] == "Job"]


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a Job's pod, init containers first."""
    spec = pod_spec(job)
    return [*spec.get("initContainers", []), *spec["containers"]]


def expand(text: str, env: Mapping[str, str]) -> str:
    """`$(NAME)` replaced by env[NAME] and `$$` by `$`, as the kubelet expands a container's command and
    args; a reference to a name not in env is left as written (kubernetes' third_party expansion.Expand)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            after = text[i + 1]
            if after == "$":
                out.append("$")
                i += 2
                continue
            if after == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    i = close + 1
                    continue
            out.append(text[i : i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def job_outcome(job: dict[str, Any], exits: Mapping[str, int], conditions: frozenset[str] = frozenset()) -> Outcome:
    """What the Job controller does with a pod of `job` whose containers exited with `exits` (name -> code,
    for those that ran) and that carries the pod `conditions`, by the Job's podFailurePolicy: the first
    rule that matches decides; none matching counts the failure. With restartPolicy Never a pod succeeded
    when every container exited 0, and a succeeded pod completes a Job of one completion."""
    if all(code == 0 for code in exits.values()):
        return "complete"
    actions: dict[str, Outcome] = {"FailJob": "fail_job", "Count": "count", "Ignore": "ignore"}
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        if "onExitCodes" in rule:
            requirement = rule["onExitCodes"]
            name = requirement.get("containerName")
            codes = [code for container, code in exits.items() if code != 0 and name in (None, container)]
            values = set(requirement["values"])
            if requirement["operator"] == "In":
                matched = any(code in values for code in codes)
            else:
                matched = any(code not in values for code in codes)
        else:
            matched = any(
                pattern["type"] in conditions and pattern.get("status", "True") == "True"
                for pattern in rule["onPodConditions"]
            )
        if matched:
            return actions[rule["action"]]
    return "count"
