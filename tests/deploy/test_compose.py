"""docker-compose.yml: valid against the Compose specification, and its init step provisions a federation
(identities, tokens, certificates, configs) that the programs' own settings models accept as rendered, and
Grafana's admin password. How its services restart: test_restarts.py."""

from __future__ import annotations

import copy
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedlora_common.settings import load_settings
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from tests.deploy.schemas import compose_validator, problems
from tests.deploy.support import (
    REPO,
    coordinator_command,
    entrypoint,
    identity_public_of,
    paths_named,
    program_env,
    sha256_hex,
    worker_command,
)

COMPOSE = REPO / "docker-compose.yml"
CONFIG_DIR = PurePosixPath("/etc/fedlora")  # where the `config` volume is mounted in every service


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def _argv(service: dict[str, Any]) -> list[str]:
    """What a service runs: its image's ENTRYPOINT (or the service's own) followed by its command."""
    dockerfile = {"fedlora-server:0.1.0": "server.Dockerfile", "fedlora-worker:0.1.0": "worker.Dockerfile"}
    start = service.get("entrypoint") or entrypoint(REPO / "deploy" / dockerfile[service["image"]])
    return [*start, *service.get("command", [])]


def _sites() -> list[str]:
    return [name.removeprefix("worker-") for name in _compose()["services"] if name.startswith("worker-")]


@dataclass(frozen=True)
class Provisioned:
    config_dir: Path
    first_public_keys: dict[str, str]
    first_grafana_password: str
    init: subprocess.CompletedProcess[str]
    again: subprocess.CompletedProcess[str]

    def local(self, path: Path | str) -> Path:
        """A path a rendered config names (inside the containers), as it lies on this machine."""
        return self.config_dir / PurePosixPath(path).relative_to(CONFIG_DIR)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """The compose init step, run as compose runs it but with the two volumes as local directories."""
    root = tmp_path_factory.mktemp("compose")
    data, config = root / "data", root / "config"
    for made in ("base-model/config.json", *(f"{site}/train.jsonl" for site in _sites())):
        (data / made).parent.mkdir(parents=True, exist_ok=True)
        (data / made).write_text("{}\n")  # present already: init keeps the lab model and data it finds
    init = _compose()["services"]["init"]
    argv = [part.replace("/opt/fedlora/deploy", str(REPO / "deploy")) for part in _argv(init)]
    env = program_env(FEDLORA_DATA_DIR=str(data), FEDLORA_CONFIG_DIR=str(config))

    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    keys = {site: (config / "identities" / f"{site}.pub").read_text().strip() for site in _sites()}
    grafana_password = (config / "grafana" / "admin-password").read_text()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)

    return Provisioned(config, keys, grafana_password, first, again)


def test_docker_compose_yml_is_valid_against_the_compose_specification() -> None:
    assert problems(compose_validator(), _compose()) == []


def test_the_compose_schema_refuses_a_misspelt_key() -> None:
    broken = copy.deepcopy(_compose())
    broken["services"]["coordinator"]["healthcheck"]["intervall"] = "5s"

    found = problems(compose_validator(), broken)

    assert any("services/coordinator/healthcheck" in p and "intervall" in p for p in found)


def test_init_provisions_every_site_and_a_second_run_keeps_the_identities(provisioned: Provisioned) -> None:
    assert provisioned.init.returncode == 0, provisioned.init.stderr
    assert provisioned.again.returncode == 0, provisioned.again.stderr
    for site in _sites():
        assert (
            identity_public_of(provisioned.config_dir / "identities" / f"{site}.key")
            == (provisioned.first_public_keys[site])
        )
    assert "identity of" not in provisioned.again.stdout


def test_the_rendered_run_yaml_loads_with_secure_aggregation_mutual_tls_and_the_sites_credentials(
    provisioned: Provisioned,
) -> None:
    settings = load_settings(RunSettings, ["--config", str(provisioned.config_dir / "run.yaml")], environ={})

    assert settings.secure_aggregation.enabled
    assert settings.listen.tls is not None
    assert settings.listen.tls.client_ca is not None
    assert [w.id for w in settings.workers] == _sites()
    for worker in settings.workers:
        token = (provisioned.config_dir / "tokens" / f"{worker.id}.token").read_text()
        assert worker.token_sha256 == sha256_hex(token)
        assert worker.identity_public == provisioned.first_public_keys[worker.id]
    for path in (settings.listen.tls.cert, settings.listen.tls.key, settings.listen.tls.client_ca):
        assert provisioned.local(path).is_file()


@pytest.mark.parametrize("site", ["clinical", "legal", "finance"])
def test_each_rendered_worker_yaml_loads_with_its_key_token_certificate_and_the_allow_list_as_peers(
    provisioned: Provisioned, site: str
) -> None:
    run = load_settings(RunSettings, ["--config", str(provisioned.config_dir / "run.yaml")], environ={})

    worker = load_settings(
        WorkerSettings, ["--config", str(provisioned.config_dir / f"worker-{site}.yaml")], environ={}
    )

    assert worker.worker_id == site
    assert worker.peers == {w.id: w.identity_public for w in run.workers}
    assert worker.identity_key is not None
    assert identity_public_of(provisioned.local(worker.identity_key)) == worker.peers[site]
    assert worker.token_file is not None
    assert sha256_hex(provisioned.local(worker.token_file).read_text()) == next(
        w.token_sha256 for w in run.workers if w.id == site
    )
    assert worker.tls is not None
    assert worker.tls.cert is not None
    certificate = x509.load_pem_x509_certificate(provisioned.local(worker.tls.cert).read_bytes())
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site
    assert worker.coordinator == "coordinator:50051"


def test_compose_services_run_the_same_commands_as_the_process_tests_on_the_configs_init_renders(
    provisioned: Provisioned,
) -> None:
    services = _compose()["services"]

    coordinator = _argv(services["coordinator"])
    workers = {site: _argv(services[f"worker-{site}"]) for site in _sites()}
    health = services["coordinator"]["healthcheck"]["test"]

    assert coordinator == coordinator_command(CONFIG_DIR / "run.yaml")
    assert health == ["CMD", "fedlora-server", "--check", "--config", str(CONFIG_DIR / "run.yaml")]
    assert workers == {site: worker_command(CONFIG_DIR / f"worker-{site}.yaml") for site in _sites()}
    for argv in (coordinator, *workers.values()):
        assert provisioned.local(argv[-1]).is_file()


def _mounted(service: dict[str, Any], path: Path | str) -> bool:
    targets = [PurePosixPath(volume.split(":")[1]) for volume in service["volumes"]]
    return any(PurePosixPath(path).is_relative_to(target) for target in targets)


def test_every_file_a_rendered_config_names_is_on_a_volume_of_its_service(provisioned: Provisioned) -> None:
    services = _compose()["services"]
    run = load_settings(RunSettings, ["--config", str(provisioned.config_dir / "run.yaml")], environ={})

    unmounted = [p for p in paths_named(run) if not _mounted(services["coordinator"], p)]
    for site in _sites():
        worker = load_settings(
            WorkerSettings, ["--config", str(provisioned.config_dir / f"worker-{site}.yaml")], environ={}
        )
        named = [*paths_named(worker), Path(worker.base_model)]
        unmounted += [p for p in named if not _mounted(services[f"worker-{site}"], p)]

    assert unmounted == []


def test_init_generates_grafanas_admin_password_readable_by_grafana_and_a_second_run_keeps_it(
    provisioned: Provisioned,
) -> None:
    directory = provisioned.config_dir / "grafana"
    password = (directory / "admin-password").read_text()

    assert re.fullmatch(r"[0-9a-f]{48}", provisioned.first_grafana_password)
    assert password == provisioned.first_grafana_password
    assert stat.S_IMODE((directory / "admin-password").stat().st_mode) == 0o644
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert [p.name for p in directory.iterdir()] == ["admin-password"]


def test_grafana_answers_on_loopback_only_to_logged_in_users_with_the_password_init_generated(
    provisioned: Provisioned,
) -> None:
    grafana = _compose()["services"]["grafana"]
    env = grafana["environment"]

    password_file = PurePosixPath(env["GF_SECURITY_ADMIN_PASSWORD__FILE"])
    (mount,) = [v for v in grafana["volumes"] if isinstance(v, dict) and password_file.is_relative_to(v["target"])]
    local = provisioned.config_dir / mount["volume"]["subpath"] / password_file.relative_to(mount["target"])

    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert (mount["type"], mount["source"], mount["read_only"]) == ("volume", "config", True)
    assert local.read_text() == provisioned.first_grafana_password
    assert grafana["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


def test_no_service_publishes_a_port_beyond_this_host() -> None:
    published = {name: s.get("ports", []) for name, s in _compose()["services"].items()}

    beyond = {name: p for name, ports in published.items() for p in ports if not p.startswith("127.0.0.1:")}

    assert beyond == {}
