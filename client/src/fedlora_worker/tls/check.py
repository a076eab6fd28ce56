"""What `check-config` (and every start) checks of `tls.ca`, `tls.cert` and `tls.key`.

Each readable PEM, the key the certificate's own, the certificate for `worker_id`, for client authentication,
signed by a CA (the one in `tls.ca` when that is the consortium's), inside its validity (a warning 14 days before
it ends), and the name the worker dials one a certificate can carry. Each fault is a `TlsFault`: one line naming
the file.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedlora_worker.config import TlsClientSettings
from fedlora_worker.tls.material import (
    Material,
    TlsFault,
    chain,
    client_auth,
    dialed_name,
    issuer,
    load,
    signed_by,
    validity_fault,
    when,
)

__all__ = ["EXPIRY_WARNING", "TlsCheck", "check_tls"]

EXPIRY_WARNING = timedelta(days=14)
"""A certificate that ends sooner than this is worth a warning: the consortium needs time to sign a new one."""
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


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
    material = load(tls)
    summary: list[str] = []
    warnings: list[str] = []
    for authority in material.ca:
        fault = validity_fault("tls.ca", tls.ca, authority, now, "; the consortium needs a new CA")
        if fault:
            raise TlsFault(fault)
        warnings += _expiring("tls.ca", tls.ca, authority, now, "the consortium needs a new CA before then")
    if material.leaf is not None and tls.cert is not None:
        summary.append(_check_certificate(material, tls.cert, worker_id, now, warnings))
        renew = "have a new one signed before then (fedlora-worker csr, then fedlora-server certs sign)"
        warnings += _expiring("tls.cert", tls.cert, material.leaf, now, renew)
    name, setting = dialed_name(tls, coordinator)
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
    return [f"{setting}: {path} expires on {when(certificate.not_valid_after_utc)} (in {_days(left)}); {hint}"]


def _days(left: timedelta) -> str:
    days = left.days
    return "less than a day" if days < 1 else f"{days} day{'s' if days != 1 else ''}"


def _check_certificate(material: Material, path: Path, worker_id: str, now: datetime, warnings: list[str]) -> str:
    leaf = material.leaf
    assert leaf is not None
    renew = "; have a new one signed (fedlora-worker csr, then fedlora-server certs sign)"
    fault = validity_fault("tls.cert", path, leaf, now, renew)
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
    if not client_auth(leaf):
        raise TlsFault(f"tls.cert: {path} is not for client authentication (its extended key usage lacks clientAuth)")
    if leaf.issuer == leaf.subject and signed_by(leaf, leaf):
        raise TlsFault(
            f"tls.cert: {path} is self-signed; the consortium CA must sign it "
            "(fedlora-worker csr, then fedlora-server certs sign)"
        )
    chained = chain(leaf, material.cert[1:], material.ca)
    if chained == "broken":
        raise TlsFault(
            f"tls.cert: {path} names {issuer(leaf)} as its issuer, but the CA of that name in tls.ca "
            f"{material.tls.ca} did not sign it (was the CA made anew?); have the consortium CA sign it"
        )
    until = when(leaf.not_valid_after_utc)
    if chained == "unknown":
        warnings.append(
            f"tls.cert: {path} is signed by {issuer(leaf)}, which tls.ca {material.tls.ca} does not hold; the "
            "coordinator admits it only if it trusts that CA (its listen.tls.client_ca)"
        )
        return f"tls.cert: CN={name}, signed by {issuer(leaf)}, valid until {until}"
    return f"tls.cert: CN={name}, signed by the CA in tls.ca, valid until {until}"
