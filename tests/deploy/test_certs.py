"""`fedlora-server certs`: a CA, a coordinator certificate naming its addresses, a client certificate per worker."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from fedlora_server.server import CoordinatorServer
from tests.deploy.support import REPO, run_program
from tests.server.conftest import run_settings, token_of


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _usages(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_certs_makes_a_ca_a_coordinator_certificate_with_its_addresses_and_one_client_certificate_per_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"

    code = main(["certs", "--out", str(out), "--workers", "clinical,legal", "--san", "10.77.0.1,fedlora.example.org"])

    ca = _load(out / "ca.crt")
    coordinator = _load(out / "coordinator.crt")
    names = coordinator.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert code == 0
    assert "clinical.crt" in capsys.readouterr().out
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    coordinator.verify_directly_issued_by(ca)
    assert set(names.get_values_for_type(x509.DNSName)) == {"coordinator", "localhost", "fedlora.example.org"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.77.0.1"),
    }
    assert _usages(coordinator) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for worker in ("clinical", "legal"):
        certificate = _load(out / f"{worker}.crt")
        certificate.verify_directly_issued_by(ca)
        assert _cn(certificate) == worker
        assert _usages(certificate) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    for key in ("ca", "coordinator", "clinical", "legal"):
        assert stat.S_IMODE((out / f"{key}.key").stat().st_mode) == 0o600


def test_a_second_run_keeps_the_ca_so_a_site_can_be_added_later(tmp_path: Path) -> None:
    first = issue_certificates(tmp_path, workers=["clinical"])
    ca_before = (tmp_path / "ca.crt").read_bytes()

    second = issue_certificates(tmp_path, workers=["finance"])

    assert not first.reused_ca
    assert second.reused_ca
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    _load(tmp_path / "finance.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))
    _load(tmp_path / "clinical.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--workers", "a/b"], "worker id 'a/b'"),
        (["--workers", "coordinator"], "would overwrite the coordinator files"),
        (["--workers", "a,a"], "each worker id once"),
        (["--workers", "a", "--san", "IP:not-an-address"], "'not-an-address' is not an IP address"),
        (["--workers", "a", "--days", "0"], "days: must be at least 1"),
        ([], "the following arguments are required: --workers"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code = main(["certs", "--out", str(tmp_path), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.count("\n") == 1


def test_the_coordinator_admits_a_worker_only_with_its_own_client_certificate(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    issue_certificates(tls, workers=["clinical", "legal"])
    settings = run_settings(
        tmp_path / "state",
        listen={
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": None,
            "tls": {"cert": tls / "coordinator.crt", "key": tls / "coordinator.key", "client_ca": tls / "ca.crt"},
        },
    )

    def join_as(worker: str, *, certificate: str) -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls / "ca.crt").read_bytes(),
            private_key=(tls / f"{certificate}.key").read_bytes(),
            certificate_chain=(tls / f"{certificate}.crt").read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
            try:
                pb_grpc.CoordinatorStub(channel).Join(
                    pb.JoinRequest(worker_id=worker, num_examples=10),
                    metadata=(("authorization", f"Bearer {token_of(worker)}"),),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    with CoordinatorServer(settings=settings) as server:
        own = join_as("clinical", certificate="clinical")
        borrowed = join_as("legal", certificate="clinical")

    assert own == grpc.StatusCode.OK
    assert borrowed == grpc.StatusCode.PERMISSION_DENIED


def test_the_old_make_certs_script_makes_the_same_files_through_fedlora_server_certs(tmp_path: Path) -> None:
    script = REPO / "deploy" / "tls" / "make-certs.sh"

    result = run_program(["sh", str(script), str(tmp_path), "clinical", "legal"], env={"EXTRA_SANS": "IP:10.0.0.5"})

    coordinator = _load(tmp_path / "coordinator.crt")
    names = coordinator.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert result.returncode == 0, result.stderr
    assert ipaddress.ip_address("10.0.0.5") in names.get_values_for_type(x509.IPAddress)
    assert _cn(_load(tmp_path / "legal.crt")) == "legal"
    _load(tmp_path / "legal.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))
