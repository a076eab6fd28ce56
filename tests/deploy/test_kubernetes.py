"""deploy/k8s: every manifest valid against the published Kubernetes schemas (strict: unknown fields
refused), the ConfigMaps' configs, once their placeholders are filled, accepted by the programs, and the
worker Job's wait for its data run as the kubelet would run it. How the Jobs end: test_restarts.py."""

from __future__ import annotations

import copy
import queue
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from fedlora_common.secagg import KeyPair, identity_keypair
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.certs import issue_certificates
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from tests.deploy.manifests import all_documents, expand, of_kind, pod_spec
from tests.deploy.schemas import kubernetes_validator, problems
from tests.deploy.support import paths_named, program_env, sha256_hex

PLACEHOLDER = re.compile(r"REPLACE_([A-Z0-9_]+?)_(TOKEN_SHA256|IDENTITY_PUBLIC)")


@pytest.mark.parametrize(("name", "document"), all_documents(), ids=[f"{n}:{d['kind']}" for n, d in all_documents()])
def test_each_manifest_is_valid_against_its_kubernetes_schema(name: str, document: dict[str, Any]) -> None:
    validator = kubernetes_validator(document["apiVersion"], document["kind"])

    assert problems(validator, document) == []


def test_the_kubernetes_schemas_refuse_a_misspelt_field_and_a_wrong_type() -> None:
    job = copy.deepcopy(of_kind("coordinator.yaml", "Job"))
    job["spec"]["backoffLimit"] = "three"
    job["spec"]["template"]["spec"]["containers"][0]["imagee"] = "fedlora-server:0.1.0"
    job["spec"]["podFailurePolicy"]["rules"][0]["onExitCode"] = {"operator": "In", "values": [2]}

    found = problems(kubernetes_validator("batch/v1", "Job"), job)

    assert any(p.startswith("spec/backoffLimit:") for p in found)
    assert any("'imagee' was unexpected" in p for p in found)
    assert any("'onExitCode' was unexpected" in p for p in found)


def _fill(text: str, keys: Mapping[str, KeyPair] | None = None) -> str:
    """The placeholders as an operator fills them: token digests and identity public keys of the sites."""
    made: dict[str, KeyPair] = dict(keys or {})

    def value(match: re.Match[str]) -> str:
        site, what = match.group(1).lower(), match.group(2)
        if what == "TOKEN_SHA256":
            return sha256_hex(f"token of {site}")
        return made.setdefault(site, identity_keypair()).public.hex()

    return PLACEHOLDER.sub(value, text)


def _config(manifest: str, key: str, tmp_path: Path, *, filled: bool = True) -> Path:
    text = of_kind(manifest, "ConfigMap")["data"][key]
    path = tmp_path / key
    path.write_text(_fill(text) if filled else text, encoding="utf-8")
    return path


def test_the_coordinator_config_map_is_refused_until_its_placeholders_are_filled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workers\.0\.token_sha256: String should match pattern"):
        load_settings(RunSettings, ["--config", str(_config("coordinator.yaml", "run.yaml", tmp_path, filled=False))])


def test_the_coordinator_config_map_once_filled_runs_secure_aggregation_over_mutual_tls(tmp_path: Path) -> None:
    settings = load_settings(RunSettings, ["--config", str(_config("coordinator.yaml", "run.yaml", tmp_path))])

    assert settings.secure_aggregation.enabled
    assert all(w.identity_public for w in settings.workers)
    assert settings.listen.tls is not None
    assert settings.listen.tls.client_ca is not None


def test_the_worker_config_map_once_filled_names_its_identity_key_and_every_peer(tmp_path: Path) -> None:
    settings = load_settings(WorkerSettings, ["--config", str(_config("worker.yaml", "worker.yaml", tmp_path))])

    assert settings.identity_key is not None
    assert set(settings.peers) == {"clinical", "legal", "finance"}
    assert settings.tls is not None
    assert settings.tls.cert is not None


def _container(manifest: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(of_kind(manifest, "Job"))["containers"]
    assert len(containers) == 1
    return containers[0]


def _mount_covers(container: dict[str, Any], path: Path | str) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in container["volumeMounts"])


@pytest.mark.parametrize(
    ("manifest", "key", "model"),
    [("coordinator.yaml", "run.yaml", RunSettings), ("worker.yaml", "worker.yaml", WorkerSettings)],
)
def test_the_job_mounts_its_config_where_the_program_reads_it_and_every_file_it_names(
    tmp_path: Path, manifest: str, key: str, model: type[RunSettings] | type[WorkerSettings]
) -> None:
    container = _container(manifest)
    settings = load_settings(model, ["--config", str(_config(manifest, key, tmp_path))])

    named = [*paths_named(settings), *([Path(settings.base_model)] if isinstance(settings, WorkerSettings) else [])]

    assert container["args"] == ["--config", f"/etc/fedlora/{key}"]
    assert any(m["mountPath"] == f"/etc/fedlora/{key}" and m.get("subPath") == key for m in container["volumeMounts"])
    assert [p for p in named if not _mount_covers(container, p)] == []


def test_the_coordinators_readiness_probe_asks_its_health_service_with_its_own_config() -> None:
    container = _container("coordinator.yaml")

    command = container["readinessProbe"]["exec"]["command"]

    assert command == ["fedlora-server", "--check", "--config", "/etc/fedlora/run.yaml"]


def test_the_coordinator_service_sends_workers_to_the_jobs_pod(tmp_path: Path) -> None:
    service = of_kind("coordinator.yaml", "Service")
    job = of_kind("coordinator.yaml", "Job")
    run = load_settings(RunSettings, ["--config", str(_config("coordinator.yaml", "run.yaml", tmp_path))])
    worker = of_kind("worker.yaml", "ConfigMap")["data"]["worker.yaml"]

    selector = service["spec"]["selector"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p for p in _container("coordinator.yaml")["ports"]}

    assert selector.items() <= labels.items()
    assert f"coordinator: {service['metadata']['name']}:{run.listen.port}" in worker
    assert ports["grpc"]["containerPort"] == run.listen.port
    assert any(p["targetPort"] == "grpc" and p["port"] == run.listen.port for p in service["spec"]["ports"])


def _wait_for_data() -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker Job's init container `wait-for-data`, and its worker container."""
    spec = pod_spec(of_kind("worker.yaml", "Job"))
    (init,) = [c for c in spec.get("initContainers", []) if c["name"] == "wait-for-data"]
    (worker,) = spec["containers"]
    return init, worker


def _mount_of(container: dict[str, Any], path: Path | str) -> tuple[str, str, str | None] | None:
    """The mount a container reads `path` through (volume, mountPath, subPath): the deepest that covers it."""
    covering = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    if not covering:
        return None
    mount = max(covering, key=lambda m: len(m["mountPath"]))
    return mount["name"], mount["mountPath"], mount.get("subPath")


def test_wait_for_data_checks_the_workers_own_config_through_the_same_mounts(tmp_path: Path) -> None:
    init, worker = _wait_for_data()
    settings = load_settings(WorkerSettings, ["--config", str(_config("worker.yaml", "worker.yaml", tmp_path))])
    volumes = {v["name"]: v for v in pod_spec(of_kind("worker.yaml", "Job"))["volumes"]}

    shell, flag, script, _name, config, claim = init["command"]
    named = [*paths_named(settings), Path(settings.base_model)]
    data_mount = _mount_of(worker, settings.base_model)
    assert data_mount is not None
    init_env = {e["name"]: e.get("value") for e in init["env"]}

    assert (init["image"], shell, flag) == (worker["image"], "/bin/sh", "-c")
    assert "fedlora-worker check-config" in script
    assert worker["args"] == ["--config", config]
    assert _mount_of(init, config) == _mount_of(worker, config) == ("config", config, "worker.yaml")
    assert [p for p in named if _mount_of(init, p) is None or _mount_of(init, p) != _mount_of(worker, p)] == []
    assert claim == volumes[data_mount[0]]["persistentVolumeClaim"]["claimName"]
    assert all(init_env.get(e["name"]) == e.get("value") for e in worker["env"])


def _as_local(text: str, mounts: list[dict[str, Any]], root: Path) -> str:
    """Every container path under one of the directory `mounts`, as it lies under `root` on this machine."""
    prefixes = sorted((m["mountPath"] for m in mounts if "subPath" not in m), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, prefixes)) + r")(?=[/\s\],]|$)", re.MULTILINE)
    return pattern.sub(lambda match: f"{root}{match.group(1)}", text)


class _Pod:
    """The wait-for-data container run as the kubelet runs it (its command with `$(VAR)` expanded, its
    env, the downward API's pod name and namespace), with its volumes as directories under `root`: the
    config filled as an operator fills it, the Secrets' files present, the data volume empty."""

    NAME = "fedlora-worker-clinical-x7k2p"
    NAMESPACE = "fedlora"

    def __init__(self, root: Path, **env: str) -> None:
        init, _ = _wait_for_data()
        keys = {"clinical": identity_keypair()}
        config = init["command"][4]
        text = _fill(of_kind("worker.yaml", "ConfigMap")["data"]["worker.yaml"], keys)
        self.config = root / config.lstrip("/")
        self.config.parent.mkdir(parents=True)
        self.config.write_text(_as_local(text, init["volumeMounts"], root), encoding="utf-8")
        self.settings = load_settings(WorkerSettings, ["--config", str(self.config)])
        assert self.settings.token_file is not None
        assert self.settings.identity_key is not None
        self.data = root / "data"
        self.data.mkdir()
        issued = issue_certificates(root / "issued", workers=["clinical"])  # real ones: check-config reads them
        tls = self.settings.tls
        assert tls is not None
        assert tls.cert is not None
        assert tls.key is not None
        secrets = {p: b"" for p in paths_named(self.settings) if self.data not in p.parents}
        secrets |= {
            tls.ca: issued.ca.read_bytes(),
            tls.cert: issued.workers["clinical"].read_bytes(),
            tls.key: issued.workers["clinical"].with_suffix(".key").read_bytes(),
            self.settings.token_file: b"token of clinical",
            self.settings.identity_key: keys["clinical"].private.hex().encode(),
        }
        for path, content in secrets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        self.env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
        self.env |= {"POD_NAME": self.NAME, "POD_NAMESPACE": self.NAMESPACE, **env}
        self.argv = [str(self.config) if a == config else expand(a, self.env) for a in init["command"]]
        self.claim = init["command"][5]
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, env=program_env(**self.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line_with(self, text: str, *, within_s: float = 120) -> str:
        """The first line (from here on) that holds `text`; fails at the deadline or at the end of output."""
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return line
        pytest.fail(f"no line with {text!r}; the container wrote: {self.output}")

    def exit_code(self, *, within_s: float = 120) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=within_s)
        while (line := self._lines.get(timeout=within_s)) is not None:
            self.output.append(line)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _copy_in_as_documented(pod: _Pod) -> None:
    """What deploy/README.md has the operator do: each directory copied in under a name the worker does
    not read, then renamed into place in one step (here as a site's tiny model and records)."""
    base_model = Path(pod.settings.base_model)
    staged = {base_model.name: pod.data / ".incoming-base-model", "records": pod.data / ".incoming-records"}
    staged[base_model.name].mkdir()
    (staged[base_model.name] / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (staged[base_model.name] / "tokenizer.json").write_text("{}", encoding="utf-8")
    (staged[base_model.name] / "model.safetensors").write_bytes(b"")
    staged["records"].mkdir()
    for path in (*pod.settings.data.train, *pod.settings.data.eval):
        assert path.parent == pod.data / "records"
        (staged["records"] / path.name).write_text('{"text": "a record of this site"}\n' * 3, encoding="utf-8")
    for name, directory in staged.items():
        directory.rename(pod.data / name)


def test_wait_for_data_waits_on_an_empty_volume_saying_for_what_then_lets_the_worker_start(tmp_path: Path) -> None:
    pod = _Pod(tmp_path / "pod", DATA_POLL_S="0.2")
    try:
        pod.start()
        waiting = pod.line_with("waiting for this site's data")
        how = pod.line_with("put the base model and the records")

        _copy_in_as_documented(pod)
        code = pod.exit_code()
    finally:
        pod.stop()

    assert "data.train" in waiting
    assert "no such file" in waiting
    assert pod.claim in how
    assert f"kubectl -n {pod.NAMESPACE} cp ./records {pod.NAME}:/data/.incoming-records -c wait-for-data" in how
    assert "deploy/README.md" in how
    assert code == 0, pod.output
    assert any(line.endswith(": ok") for line in pod.output)
    assert pod.output[-1] == "wait-for-data: the site's data passes check-config; the worker starts"


def test_wait_for_data_gives_up_with_exit_2_after_its_deadline(tmp_path: Path) -> None:
    pod = _Pod(tmp_path / "pod", DATA_WAIT_S="0")
    try:
        pod.start()
        code = pod.exit_code()
    finally:
        pod.stop()

    assert code == 2
    assert pod.output[-1] == "wait-for-data: no usable data after DATA_WAIT_S=0s; exit 2 fails the Job"
