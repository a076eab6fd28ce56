"""The worker's TLS files read and judged: certificates, keys, their dates and the names they hold.

What `check` (check-config) and `doctor` (a failed handshake) both need, so that both judge a file alike and
name its fault in the same words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedlora_worker.config import TlsClientSettings

__all__ = [
    "Material",
    "TlsFault",
    "chain",
    "client_auth",
    "dialed_name",
    "issuer",
    "load",
    "public_der",
    "signed_by",
    "split_target",
    "validity_fault",
    "when",
]


class TlsFault(ValueError):
    """This site's TLS material or settings cannot work; the message is one line naming the setting and file."""


@dataclass(frozen=True)
class Material:
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


def public_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load(tls: TlsClientSettings) -> Material:
    """The files, each readable and of its kind, and the key the certificate's own; TlsFault names the first fault."""
    if (tls.cert is None) != (tls.key is None):
        absent = "key" if tls.key is None else "cert"
        raise TlsFault(f"tls.{absent}: absent, and tls.cert and tls.key go together: set both (mutual TLS) or neither")
    ca = _certificates("tls.ca", tls.ca)
    cert = _certificates("tls.cert", tls.cert) if tls.cert is not None else ()
    key = _private_key("tls.key", tls.key) if tls.key is not None else None
    if key is not None and public_der(key) != public_der(cert[0]):
        raise TlsFault(
            f"tls.key: {tls.key} does not match tls.cert {tls.cert} (the certificate holds another public key); "
            "use the key the certificate was made for"
        )
    return Material(tls, ca, cert, key)


def when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def validity_fault(setting: str, path: Path, certificate: x509.Certificate, now: datetime, hint: str) -> str | None:
    if now > certificate.not_valid_after_utc:
        return f"{setting}: {path} expired on {when(certificate.not_valid_after_utc)}{hint}"
    if now < certificate.not_valid_before_utc:
        return (
            f"{setting}: {path} is not valid until {when(certificate.not_valid_before_utc)}; "
            "is this host's clock right?"
        )
    return None


def issuer(certificate: x509.Certificate) -> str:
    return certificate.issuer.rfc4514_string() or "an unnamed issuer"


def signed_by(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def client_auth(certificate: x509.Certificate) -> bool:
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


def dialed_name(tls: TlsClientSettings, target: str) -> tuple[str, str]:
    """The name the coordinator's certificate must hold, and the setting it comes from."""
    if tls.server_name:
        return tls.server_name, "tls.server_name"
    return split_target(target)[0], "coordinator"


def chain(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> Literal["ok", "broken", "unknown"]:
    """Whether `leaf` chains (through the intermediates its file holds) to one of `roots`: "broken" when a CA of
    the issuer's name is there but did not sign it, "unknown" when none of that name is."""
    current = leaf
    for _ in range(1 + len(intermediates)):
        named = [root for root in roots if root.subject == current.issuer]
        if any(signed_by(current, root) for root in named):
            return "ok"
        if named:
            return "broken"
        parent = next((c for c in intermediates if c.subject == current.issuer and signed_by(current, c)), None)
        if parent is None or parent == current:
            return "unknown"
        current = parent
    return "unknown"
