"""`fedlora-server certs`: a CA, a coordinator certificate naming its addresses, a client certificate per worker;
`fedlora-worker csr` and `fedlora-server certs sign`: a site's key made and kept at the site."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from fedlora_server.server import CoordinatorServer
from fedlora_worker.cli import main as worker_main
from fedlora_worker.config import RetrySettings, TlsClientSettings
from fedlora_worker.coordinator import CONFIGURATION_REFUSALS, Refused
from fedlora_worker.tls import TlsFault, check_tls
from fedlora_worker.transport import CoordinatorClient
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
        (["--workers", "a", "--dayz", "3"], "unrecognized arguments: --dayz 3"),
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


def test_certs_without_workers_makes_the_ca_and_the_coordinator_certificate_for_sites_that_keep_their_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["certs", "--out", str(tmp_path), "--san", "coord.example.org"])

    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key"]
    assert capsys.readouterr().out.count("\n") == 2


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


# ---- keys made at the site: fedlora-worker csr, fedlora-server certs sign ------------------


def _request(path: Path, cn: str) -> Path:
    """A CSR as any tool makes one (openssl req), for a CN fedlora-worker csr would not take."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


def _tampered(path: Path) -> Path:
    """A request whose last signature byte was changed on the way: it parses, and its signature does not verify."""
    der = bytearray(x509.load_pem_x509_csr(path.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    path.write_bytes(bytes(der))
    return path


def _site_makes_a_request(site: Path, worker: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`fedlora-worker csr` at the site; returns the public key digest it printed."""
    site.mkdir(exist_ok=True)
    code = worker_main(["csr", "--key", str(site / "tls.key"), "--out", str(site / "tls.csr"), "--id", worker])
    out = capsys.readouterr().out
    assert code == 0
    return out.split("public key sha256: ")[1].split()[0]


def _mutual_tls(tmp_path: Path, tls: Path) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "tls": {"cert": tls / "coordinator.crt", "key": tls / "coordinator.key", "client_ca": tls / "ca.crt"},
    }


def test_a_key_made_at_the_site_is_signed_from_its_request_and_joins_over_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the consortium's CA and coordinator certificate; the site's key and request, made at the site.
    tls, site = tmp_path / "tls", tmp_path / "site"
    assert main(["certs", "--out", str(tls)]) == 0
    made = _site_makes_a_request(site, "clinical", capsys)

    # Execute: the CA signs the request (only the request travels), and the site joins with its own key.
    signed = main(
        ["certs", "sign", "--ca-dir", str(tls), "--csr", str(site / "tls.csr"), "--out", str(site / "tls.crt")]
    )
    out = capsys.readouterr().out
    settings = TlsClientSettings(ca=tls / "ca.crt", cert=site / "tls.crt", key=site / "tls.key")
    with CoordinatorServer(settings=run_settings(tmp_path / "state", listen=_mutual_tls(tmp_path, tls))) as server:
        client = CoordinatorClient(
            target=f"localhost:{server.port}",
            worker_id="clinical",
            token=token_of("clinical"),
            retry=RetrySettings(attempts=1),
            tls=settings,
        )
        spec = client.join(10)
        client.close()
        expiry = {
            name: server.registry.get_sample_value(
                "fedlora_tls_certificate_expiry_timestamp_seconds", {"certificate": name}
            )
            for name in ("server", "client_ca")
        }

    # Assert: a client certificate for the site's key, CN = its id, from the consortium's CA; the key stayed home.
    # The coordinator tells Prometheus when its certificate and the CA it checks sites against run out.
    assert expiry == {
        "server": _load(tls / "coordinator.crt").not_valid_after_utc.timestamp(),
        "client_ca": _load(tls / "ca.crt").not_valid_after_utc.timestamp(),
    }
    certificate = _load(site / "tls.crt")
    assert signed == 0
    assert f"public key sha256: {made} " in out
    assert spec.run_id == "test-run"
    assert _cn(certificate) == "clinical"
    assert _usages(certificate) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    certificate.verify_directly_issued_by(_load(tls / "ca.crt"))
    assert stat.S_IMODE((site / "tls.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key"]
    assert check_tls(settings, worker_id="clinical", coordinator=f"localhost:{server.port}").warnings == []


def test_a_signed_certificate_whose_cn_names_another_site_is_refused_by_the_coordinator_as_misconfiguration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the site of legal asks for, and gets, a certificate naming clinical.
    tls, site = tmp_path / "tls", tmp_path / "legal"
    issue_certificates(tls, workers=[])
    _site_makes_a_request(site, "clinical", capsys)
    main(["certs", "sign", "--ca-dir", str(tls), "--csr", str(site / "tls.csr"), "--out", str(site / "tls.crt")])
    settings = TlsClientSettings(ca=tls / "ca.crt", cert=site / "tls.crt", key=site / "tls.key")

    # Execute: it joins as legal (legal's token) with that certificate.
    with CoordinatorServer(settings=run_settings(tmp_path / "state", listen=_mutual_tls(tmp_path, tls))) as server:
        client = CoordinatorClient(
            target=f"localhost:{server.port}",
            worker_id="legal",
            token=token_of("legal"),
            retry=RetrySettings(attempts=1),
            tls=settings,
        )
        with capture_logs() as logged, pytest.raises(Refused) as refused:
            client.join(10)
        client.close()
        counted = server.registry.get_sample_value("fedlora_door_refused_total", {"reason": "certificate"})

    # Assert: PERMISSION_DENIED, a refusal only the operator can lift (the worker exits 2); check-config says so first.
    # The coordinator logs and counts it too.
    assert [(e["worker_id"], e["certificate_names"]) for e in logged if e["event"] == "certificate_refused"] == [
        ("legal", ["clinical"])
    ]
    assert counted == 1
    assert refused.value.code == "PERMISSION_DENIED"
    assert refused.value.code in CONFIGURATION_REFUSALS
    assert str(refused.value) == "join: PERMISSION_DENIED: client certificate does not name legal"
    with pytest.raises(TlsFault, match="is for 'clinical' \\(its CN\\), not worker_id 'legal'"):
        check_tls(settings, worker_id="legal", coordinator="localhost:50051")


@pytest.mark.parametrize(
    ("prepare", "line"),
    [
        (lambda d: _request(d / "r.csr", "a/b"), "--csr: {d}/r.csr: its CN 'a/b' must match [A-Za-z0-9._-]{{1,128}}"),
        (
            lambda d: _request(d / "r.csr", "coordinator"),
            "--csr: {d}/r.csr: its CN 'coordinator' would overwrite the coordinator files",
        ),
        (
            lambda d: _tampered(_request(d / "r.csr", "clinical")),
            "--csr: {d}/r.csr: its signature does not verify (altered, or not signed by the key it names); refusing it",
        ),
        (lambda d: d / "ca.crt", "--csr: {d}/ca.crt is not a certificate signing request (PEM or DER)"),
        (lambda d: d / "absent.csr", "{d}/absent.csr: No such file or directory"),
    ],
    ids=["cn-not-a-worker-id", "cn-reserved", "signature-does-not-verify", "not-a-request", "no-such-file"],
)
def test_certs_sign_refuses_a_request_it_cannot_vouch_for_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepare: Callable[[Path], Path], line: str
) -> None:
    issue_certificates(tmp_path, workers=[])
    csr = prepare(tmp_path)

    code = main(["certs", "sign", "--ca-dir", str(tmp_path), "--csr", str(csr), "--out", str(tmp_path / "w.crt")])

    assert code == 2
    assert capsys.readouterr().err == f"fedlora-server certs sign: {line.format(d=tmp_path)}\n"
    assert not (tmp_path / "w.crt").exists()


def test_certs_sign_never_overwrites_a_certificate_nor_outlives_its_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue_certificates(tmp_path, workers=[], days=10)  # the CA: 30 days
    csr = _request(tmp_path / "r.csr", "clinical")
    sign = ["certs", "sign", "--ca-dir", str(tmp_path), "--csr", str(csr), "--out"]

    overwrite = main([*sign, str(tmp_path / "coordinator.crt")])
    overwrite_err = capsys.readouterr().err
    outlive = main([*sign, str(tmp_path / "w.crt"), "--days", "365"])
    outlive_err = capsys.readouterr().err
    no_ca = main(["certs", "sign", "--ca-dir", str(tmp_path / "none"), "--csr", str(csr), "--out", "w.crt"])
    no_ca_err = capsys.readouterr().err

    assert (overwrite, outlive, no_ca) == (2, 2, 2)
    assert overwrite_err == (
        f"fedlora-server certs sign: --out: {tmp_path}/coordinator.crt exists; refusing to overwrite a certificate\n"
    )
    assert outlive_err.startswith(f"fedlora-server certs sign: --days: 365 would outlive the CA in {tmp_path} (valid")
    assert outlive_err.endswith("; --days 29 at the most\n")
    assert no_ca_err == (
        f"fedlora-server certs sign: --ca-dir: {tmp_path}/none holds no ca.crt and ca.key "
        "(fedlora-server certs --out DIR makes them)\n"
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--id", "a/b"], "--id: 'a/b' is not a worker id (it must match [A-Za-z0-9._-]{1,128})"),
        (["--id", "ca"], "--id: 'ca' is the name of the consortium's own ca certificate"),
    ],
)
def test_worker_csr_refuses_an_id_no_certificate_may_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    code = worker_main(["csr", "--key", str(tmp_path / "k"), "--out", str(tmp_path / "r.csr"), *argv])

    assert code == 2
    assert capsys.readouterr().err == f"fedlora-worker csr: {line}\n"
    assert list(tmp_path.iterdir()) == []


def test_worker_csr_never_overwrites_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "tls.key"
    key.write_text("the site's key in use\n")

    code = worker_main(["csr", "--key", str(key), "--out", str(tmp_path / "r.csr"), "--id", "clinical"])

    assert code == 2
    assert capsys.readouterr().err == f"fedlora-worker csr: --key: {key} exists; refusing to overwrite it\n"
    assert key.read_text() == "the site's key in use\n"
    assert not (tmp_path / "r.csr").exists()


def test_worker_csr_without_its_three_flags_says_how_to_call_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = worker_main(["csr", "--key", str(tmp_path / "k"), "--id", "clinical"])

    assert code == 2
    assert capsys.readouterr().err == (
        "fedlora-worker csr: usage: fedlora-worker csr --key FILE --out FILE.csr --id WORKER_ID\n"
    )
    assert list(tmp_path.iterdir()) == []
