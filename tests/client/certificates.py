"""Certificates as operators end up with them: the consortium's own (`fedlora_server.certs.issue_certificates`), and
the faulty ones (another CA, out of their dates, a coordinator certificate without the name a worker dials)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora_server.certs import issue_certificates
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import TlsClientSettings
from tests.server.conftest import run_settings

NOW = datetime.now(UTC)
CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
SERVER = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def sign(
    ca: Path,
    out: Path,
    *,
    cn: str,
    sans: Sequence[str] = (),
    usages: Sequence[x509.ObjectIdentifier] = CLIENT,
    valid_from: datetime = NOW - timedelta(minutes=5),
    valid_for: timedelta = timedelta(days=365),
) -> Path:
    """OUT.crt and OUT.key: a new key, certified by the CA in directory `ca` (ca.crt, ca.key) as an operator's
    tooling might have made it. Returns the certificate's path."""
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_from + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in sans]), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    out.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return out.with_suffix(".crt")


@dataclass(frozen=True)
class Pki:
    """The consortium's CA and certificates in `home`, a stranger consortium in `other`, and faulty ones in `odd`."""

    home: Path
    other: Path
    odd: Path

    def worker(self, name: str = "clinical", **overrides: Any) -> TlsClientSettings:
        """A worker's tls section: the consortium's CA, and `name`'s certificate and key; `overrides` replace any."""
        values: dict[str, Any] = {"ca": self.home / "ca.crt", "cert": self.home / f"{name}.crt"}
        values["key"] = self.home / f"{name}.key"
        return TlsClientSettings.model_validate({**values, **overrides})


def make_pki(root: Path) -> Pki:
    """Every certificate the TLS tests use, made once."""
    pki = Pki(root / "home", root / "other", root / "odd")
    issue_certificates(pki.home, workers=["clinical", "legal"])
    issue_certificates(pki.other, workers=["clinical"])
    pki.odd.mkdir()
    sign(
        pki.home, pki.odd / "expired", cn="clinical", valid_from=NOW - timedelta(days=40), valid_for=timedelta(days=10)
    )
    sign(pki.home, pki.odd / "future", cn="clinical", valid_from=NOW + timedelta(days=30))
    sign(pki.home, pki.odd / "ending", cn="clinical", valid_for=timedelta(days=5))
    sign(pki.home, pki.odd / "server-only", cn="clinical", usages=(ExtendedKeyUsageOID.SERVER_AUTH,))
    sign(pki.home, pki.odd / "elsewhere", cn="coordinator", sans=["elsewhere.example.org", "10.9.8.7"], usages=SERVER)
    sign(
        pki.home,
        pki.odd / "coordinator-expired",
        cn="coordinator",
        sans=["localhost", "127.0.0.1"],
        usages=SERVER,
        valid_from=NOW - timedelta(days=40),
        valid_for=timedelta(days=10),
    )
    _self_signed(pki.odd / "self-signed", cn="clinical")
    key = serialization.load_pem_private_key((pki.home / "clinical.key").read_bytes(), password=None)
    (pki.odd / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return pki


def _self_signed(out: Path, *, cn: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    out.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


@contextmanager
def tls_coordinator(
    state: Path, pki: Pki, *, certificate: Path | None = None, mutual: bool = True, tls: bool = True
) -> Iterator[CoordinatorServer]:
    """A coordinator on 127.0.0.1 port 0 serving the consortium's certificate (or `certificate`), requiring client
    certificates from the consortium's CA when `mutual`; plaintext when not `tls`."""
    served = certificate or pki.home / "coordinator.crt"
    listen: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": None}
    if tls:
        listen["tls"] = {"cert": served, "key": served.with_suffix(".key")}
        if mutual:
            listen["tls"]["client_ca"] = pki.home / "ca.crt"
    with CoordinatorServer(settings=run_settings(state, listen=listen)) as server:
        yield server
