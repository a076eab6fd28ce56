"""TLS to the coordinator from the site's side: its files as they must be, a key made at home, and why a handshake fails.

- `check_tls`: what `check-config` (and every start) checks of `tls.ca`, `tls.cert` and `tls.key`: each readable
  PEM, the key the certificate's own, the certificate for `worker_id`, for client authentication, signed by a CA
  (the one in `tls.ca` when that is the consortium's), inside its validity (a warning 14 days before it ends), and
  the name the worker dials one a certificate can carry. Each fault is a `TlsFault`: one line naming the file.
- `HandshakeDoctor`: one line naming the cause of a failed connection, from what gRPC reports of the call and,
  where that says too little (a coordinator that refuses a client certificate only closes the connection), from
  the files and one plain TLS handshake with the coordinator (Python's `ssl`, no gRPC); None for what may pass.
- `make_request`: `fedlora-worker csr`: an EC key written here (mode 0600; it never leaves the site) and a
  certificate signing request whose CN is the worker id, for `fedlora-server certs sign`.

No gRPC here (gRPC's C core is silenced; what it says reaches this module as a call's details), no torch.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora_worker.config import TlsClientSettings

__all__ = [
    "EXPIRY_WARNING",
    "Handshake",
    "HandshakeDoctor",
    "Request",
    "TlsCheck",
    "TlsFault",
    "check_tls",
    "handshake",
    "make_request",
    "split_target",
]

EXPIRY_WARNING = timedelta(days=14)
"""A certificate that ends sooner than this is worth a warning: the consortium needs time to sign a new one."""
WORKER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
"""As `WorkerSettings.worker_id`, and as `fedlora-server certs sign` accepts in a request's CN."""
RESERVED_IDS = ("ca", "coordinator")
"""Names `fedlora-server certs` gives its own files and certificates: no site may take them."""
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""What an HTTP/2 client sends first (and an empty SETTINGS frame): a gRPC server that accepts the connection answers."""


class TlsFault(ValueError):
    """This site's TLS material or settings cannot work; the message is one line naming the setting and file."""


# ---- the files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Material:
    """The worker's TLS files as loaded: the CAs it trusts, its certificate (leaf first) and key, if any."""

    tls: TlsClientSettings
    ca: tuple[x509.Certificate, ...]
    cert: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes | None

    @property
    def leaf(self) -> x509.Certificate | None:
        return self.cert[0] if self.cert else None


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsFault(f"{setting}: {path}: no such file") from None
    except OSError as exc:
        raise TlsFault(f"{setting}: {path}: {exc.strerror}") from None


def _certificates(setting: str, path: Path) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(_read(setting, path)))
    except ValueError:
        raise TlsFault(f"{setting}: {path} holds no PEM certificate") from None


def _private_key(setting: str, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(setting, path), password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TlsFault(
            f"{setting}: {path} is encrypted; gRPC reads only unencrypted keys (keep it mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFault(f"{setting}: {path} is not a PEM private key") from None


def _public_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load(tls: TlsClientSettings) -> _Material:
    """The files, each readable and of its kind, and the key the certificate's own; TlsFault names the first fault."""
    if (tls.cert is None) != (tls.key is None):
        absent = "key" if tls.key is None else "cert"
        raise TlsFault(f"tls.{absent}: absent, and tls.cert and tls.key go together: set both (mutual TLS) or neither")
    ca = _certificates("tls.ca", tls.ca)
    cert = _certificates("tls.cert", tls.cert) if tls.cert is not None else ()
    key = _private_key("tls.key", tls.key) if tls.key is not None else None
    if key is not None and _public_der(key) != _public_der(cert[0]):
        raise TlsFault(
            f"tls.key: {tls.key} does not match tls.cert {tls.cert} (the certificate holds another public key); "
            "use the key the certificate was made for"
        )
    return _Material(tls, ca, cert, key)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _validity_fault(setting: str, path: Path, certificate: x509.Certificate, now: datetime, hint: str) -> str | None:
    if now > certificate.not_valid_after_utc:
        return f"{setting}: {path} expired on {_when(certificate.not_valid_after_utc)}{hint}"
    if now < certificate.not_valid_before_utc:
        return (
            f"{setting}: {path} is not valid until {_when(certificate.not_valid_before_utc)}; "
            "is this host's clock right?"
        )
    return None


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _issuer(certificate: x509.Certificate) -> str:
    return certificate.issuer.rfc4514_string() or "an unnamed issuer"


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _client_auth(certificate: x509.Certificate) -> bool:
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def split_target(target: str) -> tuple[str, int]:
    """The host and port of a gRPC target (`host:port`, `[v6]:port`, `dns:///host:port`); gRPC's default port 443."""
    rest = re.sub(r"^(dns:(//[^/]*/)?|ipv4:|ipv6:)", "", target)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    return host, int(port) if port.isdigit() else 443


def _dialed_name(tls: TlsClientSettings, target: str) -> tuple[str, str]:
    """The name the coordinator's certificate must hold, and the setting it comes from."""
    if tls.server_name:
        return tls.server_name, "tls.server_name"
    return split_target(target)[0], "coordinator"


def _nameable(name: str) -> bool:
    """Whether a certificate can name `name`: an IP address, or a DNS name (what gRPC checks against its SANs)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return bool(_DNS_NAME.match(name))
    return True


@dataclass(frozen=True)
class TlsCheck:
    """What `check_tls` found: lines for check-config's summary, and warnings (nothing refused)."""

    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_tls(tls: TlsClientSettings, *, worker_id: str, coordinator: str, now: datetime | None = None) -> TlsCheck:
    """The worker's TLS files and settings as the coordinator will see them; TlsFault names the first fault."""
    now = now or datetime.now(UTC)
    material = _load(tls)
    summary: list[str] = []
    warnings: list[str] = []
    for authority in material.ca:
        fault = _validity_fault("tls.ca", tls.ca, authority, now, "; the consortium needs a new CA")
        if fault:
            raise TlsFault(fault)
        warnings += _expiring("tls.ca", tls.ca, authority, now, "the consortium needs a new CA before then")
    if material.leaf is not None and tls.cert is not None:
        summary.append(_check_certificate(material, tls.cert, worker_id, now, warnings))
        renew = "have a new one signed before then (fedlora-worker csr, then fedlora-server certs sign)"
        warnings += _expiring("tls.cert", tls.cert, material.leaf, now, renew)
    name, setting = _dialed_name(tls, coordinator)
    if not _nameable(name):
        raise TlsFault(
            f"{setting}: {name!r} cannot be named in a certificate (neither a DNS name nor an IP address), "
            "so no coordinator certificate can match it"
        )
    summary.append(f"tls: the coordinator's certificate must name {name} ({setting}; checked when connecting)")
    return TlsCheck(summary, warnings)


def _expiring(setting: str, path: Path, certificate: x509.Certificate, now: datetime, hint: str) -> list[str]:
    left = certificate.not_valid_after_utc - now
    if left >= EXPIRY_WARNING:
        return []
    return [f"{setting}: {path} expires on {_when(certificate.not_valid_after_utc)} (in {_days(left)}); {hint}"]


def _days(left: timedelta) -> str:
    days = left.days
    return "less than a day" if days < 1 else f"{days} day{'s' if days != 1 else ''}"


def _check_certificate(material: _Material, path: Path, worker_id: str, now: datetime, warnings: list[str]) -> str:
    leaf = material.leaf
    assert leaf is not None
    renew = "; have a new one signed (fedlora-worker csr, then fedlora-server certs sign)"
    fault = _validity_fault("tls.cert", path, leaf, now, renew)
    if fault:
        raise TlsFault(fault)
    name = _common_name(leaf)
    if name is None:
        raise TlsFault(f"tls.cert: {path} names no CN; the coordinator admits a certificate whose CN is the worker id")
    if name != worker_id:
        raise TlsFault(
            f"tls.cert: {path} is for {name!r} (its CN), not worker_id {worker_id!r}; "
            "the coordinator admits a certificate only for the id it names"
        )
    if not _client_auth(leaf):
        raise TlsFault(f"tls.cert: {path} is not for client authentication (its extended key usage lacks clientAuth)")
    if leaf.issuer == leaf.subject and _signed_by(leaf, leaf):
        raise TlsFault(
            f"tls.cert: {path} is self-signed; the consortium CA must sign it "
            "(fedlora-worker csr, then fedlora-server certs sign)"
        )
    chain = _chain(leaf, material.cert[1:], material.ca)
    if chain == "broken":
        raise TlsFault(
            f"tls.cert: {path} names {_issuer(leaf)} as its issuer, but the CA of that name in tls.ca "
            f"{material.tls.ca} did not sign it (was the CA made anew?); have the consortium CA sign it"
        )
    until = _when(leaf.not_valid_after_utc)
    if chain == "unknown":
        warnings.append(
            f"tls.cert: {path} is signed by {_issuer(leaf)}, which tls.ca {material.tls.ca} does not hold; the "
            "coordinator admits it only if it trusts that CA (its listen.tls.client_ca)"
        )
        return f"tls.cert: CN={name}, signed by {_issuer(leaf)}, valid until {until}"
    return f"tls.cert: CN={name}, signed by the CA in tls.ca, valid until {until}"


def _chain(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> Literal["ok", "broken", "unknown"]:
    """Whether `leaf` chains (through the intermediates its file holds) to one of `roots`: "broken" when a CA of
    the issuer's name is there but did not sign it, "unknown" when none of that name is."""
    current = leaf
    for _ in range(1 + len(intermediates)):
        named = [root for root in roots if root.subject == current.issuer]
        if any(_signed_by(current, root) for root in named):
            return "ok"
        if named:
            return "broken"
        parent = next((c for c in intermediates if c.subject == current.issuer and _signed_by(current, c)), None)
        if parent is None or parent == current:
            return "unknown"
        current = parent
    return "unknown"


# ---- a key made at the site ----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What `make_request` wrote, and the SHA-256 of the public key (to compare with what the CA signs)."""

    key: Path
    csr: Path
    worker_id: str
    public_key_sha256: str


def make_request(*, key: Path, csr: Path, worker_id: str) -> Request:
    """Write a new EC (P-256) key (mode 0600; refusing to overwrite) and a CSR whose CN is `worker_id`."""
    if not WORKER_ID.match(worker_id):
        raise TlsFault(f"--id: {worker_id!r} is not a worker id (it must match [A-Za-z0-9._-]{{1,128}})")
    if worker_id in RESERVED_IDS:
        raise TlsFault(f"--id: {worker_id!r} is the name of the consortium's own {worker_id} certificate")
    for flag, path in (("--key", key), ("--out", csr)):
        if path.exists():
            raise TlsFault(f"{flag}: {path} exists; refusing to overwrite it")
    private = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id)]))
        .sign(private, hashes.SHA256())
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(key, pem, 0o600)
    try:
        _write_new(csr, request.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError:
        key.unlink()
        raise
    return Request(key, csr, worker_id, hashlib.sha256(_public_der(private)).hexdigest())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- why a handshake fails -----------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    """What one plain TLS handshake with the coordinator showed."""

    certificate: x509.Certificate | None
    """The coordinator's certificate (the leaf), unverified; None when the handshake did not get that far."""
    refused: bool
    """The coordinator ended the connection at or right after the handshake instead of speaking HTTP/2: it does
    not accept this worker's certificate (or its lack of one)."""


def handshake(target: str, tls: TlsClientSettings, *, timeout_s: float = 3.0) -> Handshake | None:
    """Connect to the coordinator as the worker does (its certificate and key, ALPN h2), verifying nothing, and
    see whether it answers; None when no TLS session came about (refused, reset, timed out: the network)."""
    host, port = split_target(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if tls.cert is not None and tls.key is not None:
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError):
            return None  # the files' own fault, which `_load` names
    sni = tls.server_name or host
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=None if _is_ip(sni) else sni) as connection,
        ):
            der = connection.getpeercert(binary_form=True)
            certificate = x509.load_der_x509_certificate(der) if der else None
            try:
                connection.sendall(_HTTP2_PREFACE)
                answered = bool(connection.recv(1))
            except TimeoutError:
                answered = True  # it holds the connection open: it did not refuse the certificate
            except (ssl.SSLError, ConnectionError):
                answered = False
            return Handshake(certificate, refused=not answered)
    except ssl.SSLError as exc:
        if "ALERT" in (exc.reason or "").upper():  # the coordinator refused this worker's certificate in the handshake
            return Handshake(None, refused=True)
        return None
    except (OSError, ValueError):
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


Kind = Literal["refused", "name", "expired", "not_yet_valid", "untrusted", "own", "plaintext", "handshake", "closed"]

_KINDS: tuple[tuple[Kind, tuple[str, ...]], ...] = (
    # An alert from the coordinator: it refused this worker's certificate (TLS 1.2, or a proxy in front).
    (
        "refused",
        (
            "alert_certificate_required",
            "alert_unknown_ca",
            "alert_bad_certificate",
            "alert_certificate_expired",
            "alert_certificate_unknown",
            "alert_unsupported_certificate",
            "alert_certificate_revoked",
            "alert_handshake_failure",
            "alert_access_denied",
        ),
    ),
    # This worker's verification of the coordinator's certificate.
    (
        "name",
        ("hostname verification", "is not in peer certificate", "hostname mismatch", "ip address mismatch"),
    ),
    ("expired", ("certificate has expired",)),
    ("not_yet_valid", ("certificate is not yet valid",)),
    (
        "untrusted",
        (
            "certificate_verify_failed",
            "unable to get local issuer",
            "unable to get issuer",
            "self signed certificate",
            "self-signed certificate",
            "unable to verify the first certificate",
            "certificate signature failure",
        ),
    ),
    # This worker's own certificate and key, which gRPC could not load or pair.
    (
        "own",
        ("failed to create security handshaker", "tsi_invalid_argument", "key_values_mismatch", "no_private_key"),
    ),
    ("plaintext", ("wrong_version_number", "packet_length_too_long", "http_request")),
    # TLS failed, and gRPC does not say why: what the coordinator's certificate shows may.
    ("handshake", ("tsi_protocol_failure", "handshake failed", "ssl_error_ssl")),
    # What a network loss says too: only a handshake of our own tells the two apart.
    ("closed", ("socket closed", "connection reset", "broken pipe", "end of file", "unexpected eof")),
)


def classify(details: str) -> Kind | None:
    """The class of TLS failure gRPC's details of an UNAVAILABLE call tell of; None: not TLS (refused, timed out)."""
    text = details.lower()
    return next((kind for kind, needles in _KINDS if any(n in text for n in needles)), None)


class HandshakeDoctor:
    """Names, in one line, why this worker cannot establish TLS with the coordinator.

    `explain` takes the details of a call that failed UNAVAILABLE. A class of failure gRPC names plainly (a name
    missing from the coordinator's certificate, an unknown CA, an expired certificate) is explained from the files
    and the coordinator's certificate; one it names vaguely (the socket closed) is told from a network loss by
    one plain handshake. Each cause is worked out once and kept until `reset` (the next call that gets through,
    or a failure of another kind)."""

    def __init__(
        self,
        *,
        target: str,
        tls: TlsClientSettings,
        probe: Callable[[str, TlsClientSettings], Handshake | None] = handshake,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._target = target
        self._tls = tls
        self._probe = probe
        self._clock = clock
        self._known: dict[Kind, str] = {}

    def reset(self) -> None:
        self._known.clear()

    def explain(self, details: str) -> str | None:
        """The cause, one line, when `details` tell of a TLS failure this site's configuration makes; None when
        they tell of something that may pass (a connection refused, reset or timed out, a coordinator restarting)."""
        kind = classify(details)
        if kind is None:
            return None
        if kind not in self._known:
            line = self._diagnose(kind, details)
            if line is None:
                return None
            self._known[kind] = line
        return self._known[kind]

    def _diagnose(self, kind: Kind, details: str) -> str | None:
        # One plain handshake (once per cause: the line is kept until reset()) where gRPC's words need it.
        probe = None if kind in ("refused", "own", "plaintext") else self._probe(self._target, self._tls)
        refused = kind == "refused" or (kind in ("closed", "handshake") and probe is not None and probe.refused)
        if kind == "closed" and not refused:
            return None  # a network loss, or a coordinator restarting: it may pass
        try:
            material = _load(self._tls)
        except TlsFault as exc:
            return str(exc)  # whatever gRPC said, these files cannot work
        if kind == "own":
            return f"tls: gRPC cannot use tls.cert and tls.key ({_gist(details)})"
        if kind == "plaintext":
            return (
                f"tls: the coordinator at {self._target} does not speak TLS on that port (it answered in plaintext); "
                "give the coordinator listen.tls, or dial its TLS port"
            )
        if refused:
            return self._refused(material)
        peer = probe.certificate if probe is not None else None
        if kind == "name":
            return self._name(peer)
        if kind == "untrusted":
            return self._untrusted(material, peer, details)
        if kind in ("expired", "not_yet_valid"):
            return self._dates(material, peer, details)
        return self._examine(material, peer, details)

    def _examine(self, material: _Material, peer: x509.Certificate | None, details: str) -> str | None:
        """gRPC says only that the handshake failed: check the coordinator's certificate as the worker does (its
        dates, the name dialed, its CA); None when nothing is found (the failure is then not named, and retried)."""
        if peer is None:
            return None
        now = self._clock()
        if not peer.not_valid_before_utc <= now <= peer.not_valid_after_utc:
            return self._dates(material, peer, details)
        if not _names(peer, _dialed_name(self._tls, self._target)[0]):
            return self._name(peer)
        if _chain(peer, (), material.ca) != "ok":
            return self._untrusted(material, peer, details)
        return None

    def _refused(self, material: _Material) -> str:
        """The coordinator does not accept this worker's certificate: why, as far as the files tell."""
        tls, leaf, now = self._tls, material.leaf, self._clock()
        if leaf is None or tls.cert is None:
            return (
                f"tls: the coordinator at {self._target} requires a client certificate and this worker presents "
                "none; set tls.cert and tls.key (fedlora-worker csr makes a key and a request for the consortium CA)"
            )
        fault = _validity_fault("tls.cert", tls.cert, leaf, now, "; the coordinator refuses it: have a new one signed")
        if fault:
            return fault
        if not _client_auth(leaf):
            return f"tls.cert: {tls.cert} is not for client authentication (its extended key usage lacks clientAuth)"
        return (
            f"tls.cert: the coordinator at {self._target} refuses {tls.cert} (issued by {_issuer(leaf)}): it does not "
            "trust the CA that signed it (its listen.tls.client_ca); have the consortium CA sign this site's certificate"
        )

    def _name(self, peer: x509.Certificate | None) -> str:
        name, setting = _dialed_name(self._tls, self._target)
        head = f"tls: the coordinator's certificate does not name {name!r}, the name this worker dials ({setting})"
        if peer is None:
            return f"{head}; have it made with --san {name}, or dial a name it holds"
        names = _subject_names(peer)
        held = ", ".join(names) if names else "no name at all (no SANs)"
        return f"{head}; it names {held}: dial one of those, or have its certificate made with --san {name}"

    def _untrusted(self, material: _Material, peer: x509.Certificate | None, details: str) -> str:
        ca = self._tls.ca
        if peer is None:
            return f"tls.ca: {ca} does not hold the CA that signed the coordinator's certificate ({_gist(details)})"
        same_name = [c for c in material.ca if c.subject == peer.issuer]
        again = " (it holds a CA of that name with another key: was the CA made anew?)" if same_name else ""
        return (
            f"tls.ca: {ca} does not hold the CA that signed the coordinator's certificate at {self._target} "
            f"(issued by {_issuer(peer)}){again}; use the consortium's ca.crt"
        )

    def _dates(self, material: _Material, peer: x509.Certificate | None, details: str) -> str:
        now, ca = self._clock(), self._tls.ca
        if peer is not None:
            if now > peer.not_valid_after_utc:
                return (
                    f"tls: the coordinator's certificate at {self._target} expired on {_when(peer.not_valid_after_utc)}; "
                    "the coordinator needs a new one (fedlora-server certs)"
                )
            if now < peer.not_valid_before_utc:
                return (
                    f"tls: the coordinator's certificate at {self._target} is not valid until "
                    f"{_when(peer.not_valid_before_utc)}; is this host's clock right?"
                )
        for authority in material.ca:
            fault = _validity_fault("tls.ca", ca, authority, now, "; the consortium needs a new CA")
            if fault:
                return fault
        return f"tls: a certificate of the coordinator's chain at {self._target} is out of its dates ({_gist(details)})"


def _names(certificate: x509.Certificate, name: str) -> bool:
    """Whether the certificate's SANs hold `name` (an IP address, or a DNS name, a wildcard for one label)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(name) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    wanted = name.lower().rstrip(".")
    for held in (n.lower().rstrip(".") for n in names.get_values_for_type(x509.DNSName)):
        if held == wanted:
            return True
        if held.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == held[2:]:
            return True
    return False


def _subject_names(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))]


def _gist(details: str) -> str:
    """gRPC's own words, without the preamble and the address: `Tls handshake failed (TSI_PROTOCOL_FAILURE): ...`."""
    text = " ".join(details.split())
    text = re.sub(r"^.*?last error: [A-Z_]+: (ipv[46]:\S+: )?", "", text)
    return f"gRPC: {text}"
