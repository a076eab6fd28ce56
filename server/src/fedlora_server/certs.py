"""`fedlora-server certs`: a private CA, the coordinator's certificate and one client certificate per worker.

Mutual TLS as the coordinator checks it: the coordinator's certificate names the addresses workers
dial (its SANs), and each worker's client certificate carries the worker id as its common name, which
must equal the id it authenticates as (`listen.tls.client_ca` turns the check on).

- `issue_certificates`: the CA (kept if there), the coordinator's certificate, and a key and certificate per
  worker named (none: a site makes its own key, below).
- `sign_request`: `certs sign`: a client certificate for a site's own key, from the request `fedlora-worker csr`
  made at the site (CN = the worker id), so the private key never travels.
- `check_listen_tls`: what `fedlora-server check-config` checks of `listen.tls` beyond readability: the key the
  certificate's own, the certificate for server authentication and in its dates, `client_ca` a CA in its dates
  (a warning 14 days before any of them ends).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora_common.settings import ConfigError
from fedlora_server.config import TlsServerSettings

__all__ = [
    "DEFAULT_SANS",
    "EXPIRY_WARNING",
    "IssuedCertificates",
    "SignedCertificate",
    "check_listen_tls",
    "issue_certificates",
    "parse_san",
    "sign_request",
]

DEFAULT_SANS = ("coordinator", "localhost", "127.0.0.1")
"""Names the coordinator's certificate always carries: the compose/Kubernetes service name and loopback."""

_WORKER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_RESERVED = ("ca", "coordinator")
_SKEW = timedelta(minutes=5)
EXPIRY_WARNING = timedelta(days=14)
"""A certificate that ends sooner than this is worth a warning at check-config."""

SubjectName = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class IssuedCertificates:
    """Where each certificate went; every key lies beside its certificate as NAME.key (mode 0600)."""

    ca: Path
    coordinator: Path
    workers: dict[str, Path]
    reused_ca: bool


def parse_san(text: str) -> SubjectName:
    """`DNS:name`, `IP:address`, or a bare name or address; ValueError names what is wrong."""
    value, kind = text.strip(), ""
    head, separator, rest = value.partition(":")
    if separator and head.upper() in ("DNS", "IP"):
        kind, value = head.upper(), rest.strip()
    if not value:
        raise ValueError(f"empty subject alternative name in {text!r}")
    if kind in ("", "IP"):
        try:
            return x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            if kind == "IP":
                raise ValueError(f"{value!r} is not an IP address") from None
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})", value):
        raise ValueError(f"{value!r} is not a DNS name")
    return x509.DNSName(value)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedLoRA"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only, replacing any earlier file atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    temporary.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.chmod(0o644)
    temporary.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class _Authority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate

    @classmethod
    def load(cls, out: Path) -> _Authority:
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{out / 'ca.key'}: expected an EC private key")
        return cls(key, x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))

    @classmethod
    def create(cls, now: datetime, days: int) -> _Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("FedLoRA CA")
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + timedelta(days=3 * days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def issue(
        self,
        common_name: str,
        *,
        now: datetime,
        days: int,
        usages: Sequence[x509.ObjectIdentifier],
        sans: Sequence[SubjectName] = (),
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        return key, self.certify(key.public_key(), common_name, now=now, days=days, usages=usages, sans=sans)

    def certify(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        *,
        now: datetime,
        days: int,
        usages: Sequence[x509.ObjectIdentifier],
        sans: Sequence[SubjectName] = (),
    ) -> x509.Certificate:
        """A certificate for `public_key` (whoever holds its private half), CN = `common_name`."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write(self, out: Path) -> None:
        _write_private(out / "ca.key", _key_pem(self.key))
        _write_public(out / "ca.crt", self.certificate.public_bytes(serialization.Encoding.PEM))


def issue_certificates(
    out: Path,
    *,
    workers: Sequence[str],
    sans: Sequence[str] = (),
    days: int = 365,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> IssuedCertificates:
    """Write OUT/ca.{crt,key} (kept if there already), coordinator.{crt,key} and WORKER.{crt,key} for each worker.

    The coordinator's certificate names DEFAULT_SANS and `sans` (the addresses workers dial) and is also
    valid for client authentication, so a health check can present it to a coordinator that requires
    mTLS. Each worker's certificate has CN = the worker id; with no workers, sites make their own keys and
    send requests to sign (`sign_request`). ValueError names a bad argument.
    """
    if days < 1:
        raise ValueError(f"days: must be at least 1, got {days}")
    for worker in workers:
        _check_worker_id(worker, what="worker id")
    if len(set(workers)) != len(workers):
        raise ValueError("workers: each worker id once")
    names: list[SubjectName] = []
    for text in (*DEFAULT_SANS, *sans):
        name = parse_san(text)
        if name not in names:
            names.append(name)
    out.mkdir(parents=True, exist_ok=True)
    now = clock()
    reused = (out / "ca.key").exists() and (out / "ca.crt").exists()
    authority = _Authority.load(out) if reused else _Authority.create(now, days)
    if not reused:
        authority.write(out)

    def write(name: str, issued: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> Path:
        key, certificate = issued
        _write_private(out / f"{name}.key", _key_pem(key))
        _write_public(out / f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM))
        return out / f"{name}.crt"

    server_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    coordinator = write(
        "coordinator", authority.issue("coordinator", now=now, days=days, usages=server_usage, sans=names)
    )
    issued = {
        worker: write(worker, authority.issue(worker, now=now, days=days, usages=[ExtendedKeyUsageOID.CLIENT_AUTH]))
        for worker in workers
    }
    return IssuedCertificates(ca=out / "ca.crt", coordinator=coordinator, workers=issued, reused_ca=reused)


def _check_worker_id(worker: str, *, what: str) -> None:
    if not _WORKER_ID.match(worker):
        raise ValueError(f"{what} {worker!r} must match [A-Za-z0-9._-]{{1,128}}")
    if worker in _RESERVED:
        raise ValueError(f"{what} {worker!r} would overwrite the {worker} files")


# ---- a site's own key: signing its request --------------------------------------------------


@dataclass(frozen=True)
class SignedCertificate:
    """What `sign_request` wrote."""

    path: Path
    worker_id: str
    not_after: datetime
    public_key_sha256: str
    """SHA-256 of the certified public key (DER SubjectPublicKeyInfo), as `fedlora-worker csr` printed it."""


def _public_key_sha256(key: CertificatePublicKeyTypes) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_request(path: Path) -> x509.CertificateSigningRequest:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
    except ValueError:
        raise ValueError(f"--csr: {path} is not a certificate signing request (PEM or DER)") from None


def sign_request(
    ca_dir: Path,
    csr: Path,
    out: Path,
    *,
    days: int = 365,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SignedCertificate:
    """A client certificate (CN = the request's CN, a worker id) for the key a site made and kept, signed with the
    CA in `ca_dir` (from `fedlora-server certs`); written to `out`, never over an existing file.

    Only the request's CN and public key are taken: the rest of the certificate is the CA's choice, as for the
    certificates `issue_certificates` makes. ValueError names what is wrong (OSError: a file)."""
    if days < 1:
        raise ValueError(f"--days: must be at least 1, got {days}")
    if not (ca_dir / "ca.crt").exists() or not (ca_dir / "ca.key").exists():
        raise ValueError(f"--ca-dir: {ca_dir} holds no ca.crt and ca.key (fedlora-server certs --out DIR makes them)")
    if out.exists():
        raise ValueError(f"--out: {out} exists; refusing to overwrite a certificate")
    request = _load_request(csr)
    if not request.is_signature_valid:
        raise ValueError(
            f"--csr: {csr}: its signature does not verify (altered, or not signed by the key it names); refusing it"
        )
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"--csr: {csr} names {len(names)} CNs; it must name one, the worker id")
    worker = str(names[0].value)
    _check_worker_id(worker, what=f"--csr: {csr}: its CN")
    public_key = request.public_key()
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
        raise ValueError(f"--csr: {csr}: an RSA key of {public_key.key_size} bits; 2048 at the least")
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ValueError(f"--csr: {csr}: a {type(public_key).__name__}; TLS here takes EC (P-256) or RSA keys")
    authority = _Authority.load(ca_dir)
    now = clock()
    if now + timedelta(days=days) > authority.certificate.not_valid_after_utc:
        left = (authority.certificate.not_valid_after_utc - now).days
        raise ValueError(
            f"--days: {days} would outlive the CA in {ca_dir} (valid until "
            f"{authority.certificate.not_valid_after_utc:%Y-%m-%d}); --days {left} at the most"
        )
    certificate = authority.certify(public_key, worker, now=now, days=days, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
        f.flush()
        os.fsync(f.fileno())
    return SignedCertificate(out, worker, certificate.not_valid_after_utc, _public_key_sha256(public_key))


# ---- the coordinator's own material, at check-config --------------------------------------


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _pem_certificates(setting: str, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{setting}: {path} holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: {path}: {exc.strerror}") from None


def _pem_key(setting: str, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise ConfigError(f"{setting}: {path} is encrypted; gRPC reads only unencrypted keys") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{setting}: {path} is not a PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: {path}: {exc.strerror}") from None


def _dates(
    setting: str, path: Path, certificate: x509.Certificate, now: datetime, warn: Callable[[str], object]
) -> None:
    if now > certificate.not_valid_after_utc:
        raise ConfigError(f"{setting}: {path} expired on {_when(certificate.not_valid_after_utc)}")
    if now < certificate.not_valid_before_utc:
        raise ConfigError(
            f"{setting}: {path} is not valid until {_when(certificate.not_valid_before_utc)}; is this host's clock right?"
        )
    left = certificate.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        days = "less than a day" if left.days < 1 else f"{left.days} day{'s' if left.days != 1 else ''}"
        warn(f"{setting}: {path} expires on {_when(certificate.not_valid_after_utc)} (in {days})")


def _usable_for(certificate: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_listen_tls(
    tls: TlsServerSettings | None,
    *,
    warn: Callable[[str], object],
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """The coordinator's TLS material as workers will meet it; ConfigError names the first fault, `warn` gets a line
    for each certificate that ends within EXPIRY_WARNING."""
    if tls is None:
        return
    now = clock()
    chain = _pem_certificates("listen.tls.cert", tls.cert)
    key = _pem_key("listen.tls.key", tls.key)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf = chain[0]
    if public != leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(
            f"listen.tls.key: {tls.key} does not match listen.tls.cert {tls.cert} (the certificate holds another "
            "public key)"
        )
    _dates("listen.tls.cert", tls.cert, leaf, now, warn)
    if not _usable_for(leaf, ExtendedKeyUsageOID.SERVER_AUTH):
        raise ConfigError(
            f"listen.tls.cert: {tls.cert} is not for server authentication (its extended key usage lacks serverAuth)"
        )
    if tls.client_ca is None:
        return
    authorities = [c for c in _pem_certificates("listen.tls.client_ca", tls.client_ca) if _is_ca(c)]
    if not authorities:
        raise ConfigError(f"listen.tls.client_ca: {tls.client_ca} holds no CA certificate (basic constraints CA)")
    for authority in authorities:
        _dates("listen.tls.client_ca", tls.client_ca, authority, now, warn)
