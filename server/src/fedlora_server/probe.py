"""`fedlora-server --check`: ask the coordinator a run.yaml describes whether it is SERVING (container health).

The coordinator reports NOT_SERVING until it has restored its state and started, and again once the
run has failed; a coordinator that is not listening does not answer at all. Both are unhealthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlora_server.config import ListenSettings

__all__ = ["ProbeResult", "probe", "probe_address"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


@dataclass(frozen=True)
class ProbeResult:
    address: str
    status: str
    """SERVING, NOT_SERVING, or the gRPC status code of a failed call (UNAVAILABLE, DEADLINE_EXCEEDED...)."""

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"

    def line(self) -> str:
        return f"{self.address}: {self.status}"


def probe_address(listen: ListenSettings) -> str:
    """Where to reach a coordinator listening as `listen` from its own host (a wildcard means loopback)."""
    host = _WILDCARDS.get(listen.host, listen.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{listen.port}"


def _first_dns_name(certificate_pem: bytes) -> str | None:
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def _channel(listen: ListenSettings, address: str) -> grpc.Channel:
    tls = listen.tls
    if tls is None:
        return grpc.insecure_channel(address)
    certificate = tls.cert.read_bytes()
    if tls.client_ca is not None:
        # mTLS: trust the CA that signs the workers (and, from `fedlora-server certs`, the coordinator),
        # and present the coordinator's own certificate, which is valid for client authentication too.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.client_ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=certificate,
        )
    else:
        # Server TLS only: the certificate file must hold its chain up to the CA (a "fullchain" file).
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    name = _first_dns_name(certificate)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(address, credentials, options=options)


def probe(listen: ListenSettings, *, timeout: timedelta = timedelta(seconds=3)) -> ProbeResult:
    """The health of the whole server ("") as the coordinator reports it; OSError if a TLS file is unreadable."""
    address = probe_address(listen)
    with _channel(listen, address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout.total_seconds()
            )
        except grpc.RpcError as exc:
            return ProbeResult(address, exc.code().name)
    return ProbeResult(address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
