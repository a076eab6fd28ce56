"""`fedlora-server check-config` checks the coordinator's own TLS material as workers will meet it
(`fedlora_server.certs.check_listen_tls`): each fault one line naming the file, exit 2; a certificate
near its end a warning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from tests.client.certificates import SERVER, sign
from tests.deploy.support import sha256_hex, write_yaml

GOOD = {
    "base_model": "tiny",
    "workers": [{"id": "clinical", "token_sha256": sha256_hex("t")}],
    "min_workers": 1,
    "secure_aggregation": {"enabled": False},
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The consortium's files, and a coordinator certificate out of its dates, near its end, or for clients only."""
    directory = tmp_path_factory.mktemp("tls")
    issue_certificates(directory, workers=["clinical"])
    now = datetime.now(UTC)
    sign(
        directory,
        directory / "expired",
        cn="coordinator",
        sans=["localhost"],
        usages=SERVER,
        valid_from=now - timedelta(days=40),
        valid_for=timedelta(days=10),
    )
    sign(
        directory,
        directory / "ending",
        cn="coordinator",
        sans=["localhost"],
        usages=SERVER,
        valid_for=timedelta(days=3),
    )
    sign(
        directory,
        directory / "client-only",
        cn="coordinator",
        sans=["localhost"],
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    )
    return directory


def _check(tmp_path: Path, cert: Path, key: Path, client_ca: Path | None) -> int:
    files = {"cert": str(cert), "key": str(key)} | ({"client_ca": str(client_ca)} if client_ca else {})
    listen = {"host": "0.0.0.0", "tls": files}
    return main(["check-config", str(write_yaml(tmp_path / "run.yaml", {**GOOD, "listen": listen}))])


def _until(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "line"),
    [
        (
            "coordinator.crt",
            "clinical.key",
            "ca.crt",
            "listen.tls.key: {d}/clinical.key does not match listen.tls.cert {d}/coordinator.crt (the certificate "
            "holds another public key)",
        ),
        ("expired.crt", "expired.key", "ca.crt", "listen.tls.cert: {d}/expired.crt expired on {expired}"),
        (
            "client-only.crt",
            "client-only.key",
            None,
            "listen.tls.cert: {d}/client-only.crt is not for server authentication (its extended key usage lacks "
            "serverAuth)",
        ),
        (
            "coordinator.crt",
            "coordinator.key",
            "clinical.crt",
            "listen.tls.client_ca: {d}/clinical.crt holds no CA certificate (basic constraints CA)",
        ),
    ],
    ids=["key-of-another-certificate", "expired", "not-for-server-authentication", "client-ca-not-a-ca"],
)
def test_check_config_names_a_fault_of_the_coordinators_tls_material_in_one_line(
    tmp_path: Path,
    tls: Path,
    capsys: pytest.CaptureFixture[str],
    cert: str,
    key: str,
    client_ca: str | None,
    line: str,
) -> None:
    code = _check(tmp_path, tls / cert, tls / key, tls / client_ca if client_ca else None)

    assert code == 2
    expected = line.format(d=tls, expired=_until(tls / "expired.crt"))
    assert capsys.readouterr().err == f"fedlora-server: config error: {expected}\n"


def test_check_config_warns_of_a_coordinator_certificate_near_its_end_and_passes(
    tmp_path: Path, tls: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _check(tmp_path, tls / "ending.crt", tls / "ending.key", tls / "ca.crt")

    streams = capsys.readouterr()
    assert code == 0
    assert streams.err == (
        f"fedlora-server: warning: listen.tls.cert: {tls}/ending.crt expires on {_until(tls / 'ending.crt')} "
        "(in 2 days)\n"
    )
    assert streams.out.startswith("ok: run ")
