"""Why a connection to the coordinator fails: one line naming the cause, or None for what may pass.

From what gRPC reports of the call and, where that says too little (a coordinator that refuses a client
certificate only closes the connection), from the files and one plain TLS handshake with the coordinator (Python's
`ssl`, no gRPC: its C core is silenced, and what it says reaches this module as a call's details).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509

from fedlora_worker.config import TlsClientSettings
from fedlora_worker.tls.material import (
    Material,
    TlsFault,
    chain,
    client_auth,
    dialed_name,
    issuer,
    load,
    split_target,
    validity_fault,
    when,
)

__all__ = ["Handshake", "HandshakeDoctor", "Kind", "classify", "handshake"]

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""What an HTTP/2 client sends first (and an empty SETTINGS frame): a gRPC server that accepts the connection answers."""


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
            return None  # the files' own fault, which `material.load` names
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
            material = load(self._tls)
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

    def _examine(self, material: Material, peer: x509.Certificate | None, details: str) -> str | None:
        """gRPC says only that the handshake failed: check the coordinator's certificate as the worker does (its
        dates, the name dialed, its CA); None when nothing is found (the failure is then not named, and retried)."""
        if peer is None:
            return None
        now = self._clock()
        if not peer.not_valid_before_utc <= now <= peer.not_valid_after_utc:
            return self._dates(material, peer, details)
        if not _names(peer, dialed_name(self._tls, self._target)[0]):
            return self._name(peer)
        if chain(peer, (), material.ca) != "ok":
            return self._untrusted(material, peer, details)
        return None

    def _refused(self, material: Material) -> str:
        """The coordinator does not accept this worker's certificate: why, as far as the files tell."""
        tls, leaf, now = self._tls, material.leaf, self._clock()
        if leaf is None or tls.cert is None:
            return (
                f"tls: the coordinator at {self._target} requires a client certificate and this worker presents "
                "none; set tls.cert and tls.key (fedlora-worker csr makes a key and a request for the consortium CA)"
            )
        fault = validity_fault("tls.cert", tls.cert, leaf, now, "; the coordinator refuses it: have a new one signed")
        if fault:
            return fault
        if not client_auth(leaf):
            return f"tls.cert: {tls.cert} is not for client authentication (its extended key usage lacks clientAuth)"
        return (
            f"tls.cert: the coordinator at {self._target} refuses {tls.cert} (issued by {issuer(leaf)}): it does not "
            "trust the CA that signed it (its listen.tls.client_ca); have the consortium CA sign this site's certificate"
        )

    def _name(self, peer: x509.Certificate | None) -> str:
        name, setting = dialed_name(self._tls, self._target)
        head = f"tls: the coordinator's certificate does not name {name!r}, the name this worker dials ({setting})"
        if peer is None:
            return f"{head}; have it made with --san {name}, or dial a name it holds"
        names = _subject_names(peer)
        held = ", ".join(names) if names else "no name at all (no SANs)"
        return f"{head}; it names {held}: dial one of those, or have its certificate made with --san {name}"

    def _untrusted(self, material: Material, peer: x509.Certificate | None, details: str) -> str:
        ca = self._tls.ca
        if peer is None:
            return f"tls.ca: {ca} does not hold the CA that signed the coordinator's certificate ({_gist(details)})"
        same_name = [c for c in material.ca if c.subject == peer.issuer]
        again = " (it holds a CA of that name with another key: was the CA made anew?)" if same_name else ""
        return (
            f"tls.ca: {ca} does not hold the CA that signed the coordinator's certificate at {self._target} "
            f"(issued by {issuer(peer)}){again}; use the consortium's ca.crt"
        )

    def _dates(self, material: Material, peer: x509.Certificate | None, details: str) -> str:
        now, ca = self._clock(), self._tls.ca
        if peer is not None:
            if now > peer.not_valid_after_utc:
                return (
                    f"tls: the coordinator's certificate at {self._target} expired on {when(peer.not_valid_after_utc)}; "
                    "the coordinator needs a new one (fedlora-server certs)"
                )
            if now < peer.not_valid_before_utc:
                return (
                    f"tls: the coordinator's certificate at {self._target} is not valid until "
                    f"{when(peer.not_valid_before_utc)}; is this host's clock right?"
                )
        for authority in material.ca:
            fault = validity_fault("tls.ca", ca, authority, now, "; the consortium needs a new CA")
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
