"""A worker that cannot establish TLS with the coordinator names the cause in one line and, after
`retry.tls_failures` identical failures in a row, gives up (exit 2) instead of retrying forever; a network
loss is still retried. Real certificates, a real in-process coordinator, the real gRPC client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from fedlora_worker.cli import main
from fedlora_worker.config import RetrySettings, TlsClientSettings
from fedlora_worker.coordinator import TlsMisconfigured, Unreachable
from fedlora_worker.tls import Handshake, HandshakeDoctor, classify
from fedlora_worker.transport import CoordinatorClient
from tests.client.certificates import Pki, make_pki, tls_coordinator
from tests.server.conftest import token_of

TLS_FAILURES = 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _date(certificate: Path, which: str = "after") -> str:
    loaded = x509.load_pem_x509_certificate(certificate.read_bytes())
    moment = loaded.not_valid_after_utc if which == "after" else loaded.not_valid_before_utc
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _client(
    target: str,
    tls: TlsClientSettings,
    retries: list[int],
    tls_failures: list[int] | None = None,
    attempts: int = 8,
) -> CoordinatorClient:
    tls_failures = [] if tls_failures is None else tls_failures
    return CoordinatorClient(
        target=target,
        worker_id="clinical",
        token=token_of("clinical"),
        retry=RetrySettings(attempts=attempts, initial_backoff_s=0.01, max_backoff_s=0.02, tls_failures=TLS_FAILURES),
        tls=tls,
        on_retry=lambda: retries.append(1),
        on_tls_failure=lambda: tls_failures.append(1),
        sleep=lambda seconds: None,
    )


@dataclass(frozen=True)
class Fault:
    """One way TLS fails: the coordinator's side, the worker's tls section, the name dialed, the line expected."""

    coordinator: Callable[[Pki], dict[str, Any]]
    worker: Callable[[Pki], TlsClientSettings]
    host: str
    line: Callable[[Pki, str], str]


FAULTS = {
    "a-name-missing-from-the-coordinator-certificate": Fault(
        lambda p: {"certificate": p.odd / "elsewhere.crt"},
        lambda p: p.worker(),
        "127.0.0.1",
        lambda p, at: (
            "tls: the coordinator's certificate does not name '127.0.0.1', the name this worker dials "
            "(coordinator); it names elsewhere.example.org, 10.9.8.7: dial one of those, or have its certificate made "
            "with --san 127.0.0.1"
        ),
    ),
    "a-server-name-missing-from-the-coordinator-certificate": Fault(
        lambda p: {},
        lambda p: p.worker(server_name="coord.example.org"),
        "localhost",
        lambda p, at: (
            "tls: the coordinator's certificate does not name 'coord.example.org', the name this worker "
            "dials (tls.server_name); it names coordinator, localhost, 127.0.0.1: dial one of those, or have its "
            "certificate made with --san coord.example.org"
        ),
    ),
    "a-ca-that-did-not-sign-the-coordinator-certificate": Fault(
        lambda p: {},
        lambda p: p.worker(ca=p.other / "ca.crt"),
        "localhost",
        lambda p, at: (
            f"tls.ca: {p.other}/ca.crt does not hold the CA that signed the coordinator's certificate at "
            f"{at} (issued by CN=FedLoRA CA,O=FedLoRA) (it holds a CA of that name with another key: was the CA made "
            "anew?); use the consortium's ca.crt"
        ),
    ),
    "a-key-that-does-not-match-the-certificate": Fault(
        lambda p: {},
        lambda p: p.worker(key=p.home / "legal.key"),
        "localhost",
        lambda p, at: (
            f"tls.key: {p.home}/legal.key does not match tls.cert {p.home}/clinical.crt (the certificate "
            "holds another public key); use the key the certificate was made for"
        ),
    ),
    "an-expired-worker-certificate": Fault(
        lambda p: {},
        lambda p: p.worker(cert=p.odd / "expired.crt", key=p.odd / "expired.key"),
        "localhost",
        lambda p, at: (
            f"tls.cert: {p.odd}/expired.crt expired on {_date(p.odd / 'expired.crt')}; the coordinator "
            "refuses it: have a new one signed"
        ),
    ),
    "a-worker-certificate-not-yet-valid": Fault(
        lambda p: {},
        lambda p: p.worker(cert=p.odd / "future.crt", key=p.odd / "future.key"),
        "localhost",
        lambda p, at: (
            f"tls.cert: {p.odd}/future.crt is not valid until {_date(p.odd / 'future.crt', 'before')}; "
            "is this host's clock right?"
        ),
    ),
    "an-expired-coordinator-certificate": Fault(
        lambda p: {"certificate": p.odd / "coordinator-expired.crt"},
        lambda p: p.worker(),
        "localhost",
        lambda p, at: (
            f"tls: the coordinator's certificate at {at} expired on "
            f"{_date(p.odd / 'coordinator-expired.crt')}; the coordinator needs a new one (fedlora-server certs)"
        ),
    ),
    "no-client-certificate-for-a-coordinator-that-requires-one": Fault(
        lambda p: {},
        lambda p: p.worker(cert=None, key=None),
        "localhost",
        lambda p, at: (
            f"tls: the coordinator at {at} requires a client certificate and this worker presents none; "
            "set tls.cert and tls.key (fedlora-worker csr makes a key and a request for the consortium CA)"
        ),
    ),
    "a-client-certificate-from-another-ca": Fault(
        lambda p: {},
        lambda p: p.worker(cert=p.other / "clinical.crt", key=p.other / "clinical.key"),
        "localhost",
        lambda p, at: (
            f"tls.cert: the coordinator at {at} refuses {p.other}/clinical.crt (issued by CN=FedLoRA CA,"
            "O=FedLoRA): it does not trust the CA that signed it (its listen.tls.client_ca); have the consortium CA sign "
            "this site's certificate"
        ),
    ),
    "a-client-certificate-not-for-client-authentication": Fault(
        lambda p: {},
        lambda p: p.worker(cert=p.odd / "server-only.crt", key=p.odd / "server-only.key"),
        "localhost",
        lambda p, at: (
            f"tls.cert: {p.odd}/server-only.crt is not for client authentication (its extended key usage "
            "lacks clientAuth)"
        ),
    ),
    "a-coordinator-without-tls": Fault(
        lambda p: {"tls": False},
        lambda p: p.worker(),
        "localhost",
        lambda p, at: (
            f"tls: the coordinator at {at} does not speak TLS on that port (it answered in plaintext); "
            "give the coordinator listen.tls, or dial its TLS port"
        ),
    ),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_worker_that_cannot_establish_tls_names_the_cause_and_gives_up_after_identical_failures(
    tmp_path: Path, pki: Pki, fault: Fault
) -> None:
    # Prepare: a coordinator, and a worker whose TLS cannot work with it.
    retries: list[int] = []
    tls_failures: list[int] = []
    with tls_coordinator(tmp_path / "state", pki, **fault.coordinator(pki)) as server:
        target = f"{fault.host}:{server.port}"
        client = _client(target, fault.worker(pki), retries, tls_failures)

        # Execute
        with pytest.raises(TlsMisconfigured) as failed:
            client.join(10)
        client.close()
        admitted = server.registry.get_sample_value("fedlora_workers_connected")

    # Assert: the cause in one line; TLS_FAILURES tries (so TLS_FAILURES - 1 retries), and nobody joined.
    assert str(failed.value) == fault.line(pki, f"localhost:{server.port}" if fault.host == "localhost" else target)
    assert len(retries) == TLS_FAILURES - 1
    assert len(tls_failures) == TLS_FAILURES  # what fedlora_worker_tls_failures_total counts
    assert admitted == 0


def test_the_same_settings_join_once_the_certificates_are_right(tmp_path: Path, pki: Pki) -> None:
    retries: list[int] = []
    with tls_coordinator(tmp_path / "state", pki) as server:
        client = _client(f"localhost:{server.port}", pki.worker(), retries)

        spec = client.join(10)
        client.close()

    assert spec.run_id == "test-run"
    assert retries == []


# ---- a network loss is not a TLS fault ------------------------------------------------------


@contextmanager
def hanging_up() -> Iterator[int]:
    """A port that accepts each connection and closes it at once: a coordinator's host rebooting, a proxy failing."""
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.05)

        def serve() -> None:
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                connection.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("loss", ["connection-refused", "connection-closed-at-once"])
def test_a_network_loss_under_tls_is_retried_through_every_attempt_and_left_to_rejoin(pki: Pki, loss: str) -> None:
    # Prepare: more attempts than TLS failures allowed, so a loss taken for a TLS fault would end sooner.
    retries: list[int] = []
    with hanging_up() as hanging:
        port = _closed_port() if loss == "connection-refused" else hanging
        client = _client(f"localhost:{port}", pki.worker(), retries, attempts=TLS_FAILURES + 3)

        # Execute
        with pytest.raises(Unreachable) as lost:
            client.join(10)
        client.close()

    # Assert: Unreachable after every attempt (the daemon waits and joins again), never TlsMisconfigured.
    assert str(lost.value) == f"join: UNAVAILABLE after {TLS_FAILURES + 3} attempts"
    assert len(retries) == TLS_FAILURES + 2


def test_a_socket_closed_is_a_tls_fault_only_when_a_handshake_of_its_own_shows_the_coordinator_refusing(
    pki: Pki,
) -> None:
    # Prepare: gRPC's words for both a network loss and a refused client certificate.
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    probes: list[str] = []

    def no_session(target: str, tls: TlsClientSettings) -> None:
        probes.append(target)

    doctor = HandshakeDoctor(target="localhost:1", tls=pki.worker(cert=None, key=None), probe=no_session)

    # Execute
    first, second = doctor.explain(closed), doctor.explain(closed)

    # Assert: no TLS session came about, so it is a network loss, probed each time it is seen.
    assert (first, second) == (None, None)
    assert probes == ["localhost:1", "localhost:1"]


@pytest.mark.parametrize(
    ("served", "line"),
    [
        (
            "odd/elsewhere.crt",
            "tls: the coordinator's certificate does not name 'localhost', the name this worker dials (coordinator); "
            "it names elsewhere.example.org, 10.9.8.7: dial one of those, or have its certificate made with --san "
            "localhost",
        ),
        ("home/coordinator.crt", None),
    ],
    ids=["a-name-it-lacks", "nothing-wrong-with-it"],
)
def test_a_handshake_grpc_says_only_failed_is_named_from_the_coordinators_certificate_or_not_at_all(
    pki: Pki, served: str, line: str | None
) -> None:
    # Prepare: gRPC's bare words, and the certificate one plain handshake fetched from the coordinator.
    certificate = x509.load_pem_x509_certificate((pki.home.parent / served).read_bytes())
    doctor = HandshakeDoctor(
        target="localhost:50051", tls=pki.worker(), probe=lambda target, tls: Handshake(certificate, refused=False)
    )

    # Execute
    cause = doctor.explain("Ssl handshake failed (TSI_PROTOCOL_FAILURE)")

    # Assert: a cause the certificate shows is named; with none, the failure is retried as ever.
    assert cause == line


@pytest.mark.parametrize(
    ("details", "kind"),
    [
        ("Ssl handshake failed (TSI_PROTOCOL_FAILURE)", "handshake"),
        ("Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED", "untrusted"),
        ("Peer name localhost is not in peer certificate", "name"),
        ("Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.", "name"),
        ("Handshaker factory creation failed with TSI_INVALID_ARGUMENT", "own"),
        ("error:0B080074:x509 certificate routines:X509_check_private_key:KEY_VALUES_MISMATCH", "own"),
        ("Tls handshake failed: SSL_ERROR_SSL: error:10000412:SSLV3_ALERT_CERTIFICATE_EXPIRED", "refused"),
        ("Tls handshake failed: TLSV13_ALERT_CERTIFICATE_REQUIRED", "refused"),
        ("CERTIFICATE_VERIFY_FAILED: certificate has expired", "expired"),
        ("CERTIFICATE_VERIFY_FAILED: certificate is not yet valid", "not_yet_valid"),
        ("ipv4:127.0.0.1:50051: Socket closed", "closed"),
        ("recvmsg:Connection reset by peer", "closed"),
        ("Failed to connect to remote host: Connection refused", None),
        ("Deadline Exceeded", None),
        ("DNS resolution failed for coord.example.org:50051", None),
    ],
)
def test_grpc_details_are_classified_by_the_class_of_tls_failure_they_tell_of(details: str, kind: str | None) -> None:
    assert classify(details) == kind


# ---- the program ----------------------------------------------------------------------------


def test_the_worker_program_exits_2_with_the_cause_after_three_identical_tls_failures(
    tmp_path: Path, pki: Pki, tiny_base_model: Path
) -> None:
    # Prepare: a site whose every check passes, dialing an address the coordinator's certificate does not name.
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"kalo miren {i}."}) + "\n" for i in range(4)), encoding="utf-8")
    log = tmp_path / "worker.log"
    with tls_coordinator(tmp_path / "state", pki, certificate=pki.odd / "elsewhere.crt") as server:
        config = tmp_path / "worker.yaml"
        config.write_text(
            f"worker_id: clinical\ntoken: {token_of('clinical')}\nbase_model: {tiny_base_model}\n"
            f"coordinator: 127.0.0.1:{server.port}\nprogress: false\nthreads: 1\ndata:\n  train: [{train}]\n"
            f"tls: {{ca: {pki.home}/ca.crt, cert: {pki.home}/clinical.crt, key: {pki.home}/clinical.key}}\n"
            "retry: {initial_backoff_s: 0.05, max_backoff_s: 0.1}\n"
        )

        # Execute
        with log.open("w") as err:
            result = subprocess.run(
                [sys.executable, "-m", "fedlora_worker", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=300,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        admitted = server.registry.get_sample_value("fedlora_workers_connected")

    # Assert: exit 2 and the one line; the log shows the three failures, and nobody joined.
    lines = log.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert result.returncode == 2, lines[-5:]
    assert lines[-1] == (
        "fedlora-worker: tls: the coordinator's certificate does not name '127.0.0.1', the name this worker dials "
        "(coordinator); it names elsewhere.example.org, 10.9.8.7: dial one of those, or have its certificate made "
        "with --san 127.0.0.1"
    )
    assert [e["failures"] for e in events if e["event"] == "tls_failed"] == [1, 2, 3]
    assert [e["event"] for e in events][-1] == "tls_misconfigured"
    assert admitted == 0


# ---- check-config ---------------------------------------------------------------------------


def _worker_yaml(tmp_path: Path, base: Path | str, tls: str, coordinator: str = "127.0.0.1:50051") -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "kalo miren."}) + "\n", encoding="utf-8")
    config = tmp_path / "worker.yaml"
    config.write_text(
        f"worker_id: clinical\ntoken: s3cret\nbase_model: {base}\ncoordinator: {coordinator}\n"
        f"data:\n  train: [{train}]\ntls: {tls}\n"
    )
    return config


CHECKED = {
    "a-key-that-does-not-match-the-certificate": (
        "{{ca: {h}/ca.crt, cert: {h}/clinical.crt, key: {h}/legal.key}}",
        "127.0.0.1:50051",
        "tls.key: {h}/legal.key does not match tls.cert {h}/clinical.crt (the certificate holds another public key); "
        "use the key the certificate was made for",
    ),
    "a-certificate-for-another-site": (
        "{{ca: {h}/ca.crt, cert: {h}/legal.crt, key: {h}/legal.key}}",
        "127.0.0.1:50051",
        "tls.cert: {h}/legal.crt is for 'legal' (its CN), not worker_id 'clinical'; the coordinator admits a "
        "certificate only for the id it names",
    ),
    "a-certificate-the-ca-in-tls-ca-did-not-sign": (
        "{{ca: {h}/ca.crt, cert: {o}/clinical.crt, key: {o}/clinical.key}}",
        "127.0.0.1:50051",
        "tls.cert: {o}/clinical.crt names CN=FedLoRA CA,O=FedLoRA as its issuer, but the CA of that name in tls.ca "
        "{h}/ca.crt did not sign it (was the CA made anew?); have the consortium CA sign it",
    ),
    "a-self-signed-certificate": (
        "{{ca: {h}/ca.crt, cert: {d}/self-signed.crt, key: {d}/self-signed.key}}",
        "127.0.0.1:50051",
        "tls.cert: {d}/self-signed.crt is self-signed; the consortium CA must sign it (fedlora-worker csr, then "
        "fedlora-server certs sign)",
    ),
    "an-expired-certificate": (
        "{{ca: {h}/ca.crt, cert: {d}/expired.crt, key: {d}/expired.key}}",
        "127.0.0.1:50051",
        "tls.cert: {d}/expired.crt expired on {expired}; have a new one signed (fedlora-worker csr, then "
        "fedlora-server certs sign)",
    ),
    "a-certificate-not-yet-valid": (
        "{{ca: {h}/ca.crt, cert: {d}/future.crt, key: {d}/future.key}}",
        "127.0.0.1:50051",
        "tls.cert: {d}/future.crt is not valid until {future}; is this host's clock right?",
    ),
    "a-certificate-not-for-client-authentication": (
        "{{ca: {h}/ca.crt, cert: {d}/server-only.crt, key: {d}/server-only.key}}",
        "127.0.0.1:50051",
        "tls.cert: {d}/server-only.crt is not for client authentication (its extended key usage lacks clientAuth)",
    ),
    "a-certificate-without-its-key": (
        "{{ca: {h}/ca.crt, cert: {h}/clinical.crt}}",
        "127.0.0.1:50051",
        "tls.key: absent, and tls.cert and tls.key go together: set both (mutual TLS) or neither",
    ),
    "an-encrypted-key": (
        "{{ca: {h}/ca.crt, cert: {h}/clinical.crt, key: {d}/encrypted.key}}",
        "127.0.0.1:50051",
        "tls.key: {d}/encrypted.key is encrypted; gRPC reads only unencrypted keys (keep it mode 0600)",
    ),
    "a-ca-file-that-is-not-a-certificate": (
        "{{ca: {h}/clinical.key, cert: {h}/clinical.crt, key: {h}/clinical.key}}",
        "127.0.0.1:50051",
        "tls.ca: {h}/clinical.key holds no PEM certificate",
    ),
    "a-coordinator-name-no-certificate-can-hold": (
        "{{ca: {h}/ca.crt, cert: {h}/clinical.crt, key: {h}/clinical.key}}",
        "coordinator_1:50051",
        "coordinator: 'coordinator_1' cannot be named in a certificate (neither a DNS name nor an IP address), so no "
        "coordinator certificate can match it",
    ),
    "a-server-name-no-certificate-can-hold": (
        "{{ca: {h}/ca.crt, cert: {h}/clinical.crt, key: {h}/clinical.key, server_name: 'coord example'}}",
        "127.0.0.1:50051",
        "tls.server_name: 'coord example' cannot be named in a certificate (neither a DNS name nor an IP address), "
        "so no coordinator certificate can match it",
    ),
}


@pytest.mark.parametrize(("tls", "coordinator", "line"), CHECKED.values(), ids=CHECKED.keys())
def test_check_config_names_each_fault_of_the_tls_material_in_one_line_and_exits_2(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], tls: str, coordinator: str, line: str
) -> None:
    paths = {"h": pki.home, "o": pki.other, "d": pki.odd}
    dates = {"expired": _date(pki.odd / "expired.crt"), "future": _date(pki.odd / "future.crt", "before")}
    config = _worker_yaml(tmp_path, "/models/base", tls.format(**paths), coordinator)

    code = main(["check-config", str(config)])

    assert code == 2
    assert capsys.readouterr().err == f"fedlora-worker: {line.format(**paths, **dates)}\n"


def test_check_config_reports_the_certificate_and_the_name_the_coordinator_must_hold(
    tmp_path: Path, pki: Pki, tiny_base_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = f"{{ca: {pki.home}/ca.crt, cert: {pki.home}/clinical.crt, key: {pki.home}/clinical.key}}"
    config = _worker_yaml(tmp_path, tiny_base_model, tls, coordinator="coord.example.org:50051")

    code = main(["check-config", str(config)])

    streams = capsys.readouterr()
    assert code == 0, streams.err
    assert streams.err == ""
    assert (
        f"  tls.cert: CN=clinical, signed by the CA in tls.ca, valid until {_date(pki.home / 'clinical.crt')}\n"
        in streams.out
    )
    assert (
        "  tls: the coordinator's certificate must name coord.example.org (coordinator; checked when connecting)\n"
        in (streams.out)
    )


def test_check_config_warns_of_a_certificate_that_ends_within_14_days_and_passes(
    tmp_path: Path, pki: Pki, tiny_base_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = f"{{ca: {pki.home}/ca.crt, cert: {pki.odd}/ending.crt, key: {pki.odd}/ending.key}}"
    config = _worker_yaml(tmp_path, tiny_base_model, tls)

    code = main(["check-config", str(config)])

    streams = capsys.readouterr()
    assert code == 0
    assert streams.err == (
        f"fedlora-worker: warning: tls.cert: {pki.odd}/ending.crt expires on {_date(pki.odd / 'ending.crt')} "
        "(in 4 days); have a new one signed before then (fedlora-worker csr, then fedlora-server certs sign)\n"
    )
    assert streams.out.startswith(f"{config}: ok\n")
