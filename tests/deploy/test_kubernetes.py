"""deploy/k8s: every manifest valid against the published Kubernetes schemas (strict: unknown fields
refused), and the ConfigMaps' configs, once their placeholders are filled, accepted by the programs."""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from fedlora_common.secagg import identity_keypair
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from tests.deploy.schemas import kubernetes_validator, problems
from tests.deploy.support import REPO, paths_named, sha256_hex

K8S = REPO / "deploy" / "k8s"
PLACEHOLDER = re.compile(r"REPLACE_([A-Z0-9_]+?)_(TOKEN_SHA256|IDENTITY_PUBLIC)")


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]


def _of_kind(name: str, kind: str) -> dict[str, Any]:
    return next(d for d in _documents(name) if d["kind"] == kind)


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, d) for path in sorted(K8S.glob("*.yaml")) for d in _documents(path.name)]


@pytest.mark.parametrize(("name", "document"), _all_documents(), ids=[f"{n}:{d['kind']}" for n, d in _all_documents()])
def test_each_manifest_is_valid_against_its_kubernetes_schema(name: str, document: dict[str, Any]) -> None:
    validator = kubernetes_validator(document["apiVersion"], document["kind"])

    assert problems(validator, document) == []


def test_the_kubernetes_schemas_refuse_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = copy.deepcopy(_of_kind("coordinator.yaml", "Deployment"))
    deployment["spec"]["replicas"] = "one"
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "fedlora-server:0.1.0"

    found = problems(kubernetes_validator("apps/v1", "Deployment"), deployment)

    assert any(p.startswith("spec/replicas:") for p in found)
    assert any("'imagee' was unexpected" in p for p in found)


def _fill(text: str) -> str:
    """The placeholders as an operator fills them: token digests and identity public keys of the sites."""
    keys: dict[str, str] = {}

    def value(match: re.Match[str]) -> str:
        site, what = match.group(1).lower(), match.group(2)
        if what == "TOKEN_SHA256":
            return sha256_hex(f"token of {site}")
        return keys.setdefault(site, identity_keypair().public.hex())

    return PLACEHOLDER.sub(value, text)


def _config(manifest: str, key: str, tmp_path: Path, *, filled: bool = True) -> Path:
    text = _of_kind(manifest, "ConfigMap")["data"][key]
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
    containers: list[dict[str, Any]] = _of_kind(manifest, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _mount_covers(container: dict[str, Any], path: Path | str) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in container["volumeMounts"])


@pytest.mark.parametrize(
    ("manifest", "key", "model"),
    [("coordinator.yaml", "run.yaml", RunSettings), ("worker.yaml", "worker.yaml", WorkerSettings)],
)
def test_the_deployment_mounts_its_config_where_the_program_reads_it_and_every_file_it_names(
    tmp_path: Path, manifest: str, key: str, model: type[RunSettings] | type[WorkerSettings]
) -> None:
    container = _container(manifest)
    settings = load_settings(model, ["--config", str(_config(manifest, key, tmp_path))])

    named = [*paths_named(settings), *([Path(settings.base_model)] if isinstance(settings, WorkerSettings) else [])]

    assert container["args"] == ["--config", f"/etc/fedlora/{key}"]
    assert any(m["mountPath"] == f"/etc/fedlora/{key}" and m.get("subPath") == key for m in container["volumeMounts"])
    assert [p for p in named if not _mount_covers(container, p)] == []


def test_the_coordinators_probes_ask_its_health_service_with_its_own_config() -> None:
    container = _container("coordinator.yaml")

    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["fedlora-server", "--check", "--config", "/etc/fedlora/run.yaml"]
