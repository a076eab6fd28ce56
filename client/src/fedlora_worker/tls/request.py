"""`fedlora-worker csr`: a TLS key made at the site, which never leaves it, and a request for the consortium CA.

The key is an EC key written here (mode 0600); the certificate signing request names the worker id as its CN, for
`fedlora-server certs sign`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlora_worker.tls.material import TlsFault, public_der

__all__ = ["Request", "make_request"]

WORKER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
"""As `WorkerSettings.worker_id`, and as `fedlora-server certs sign` accepts in a request's CN."""
RESERVED_IDS = ("ca", "coordinator")
"""Names `fedlora-server certs` gives its own files and certificates: no site may take them."""


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
    return Request(key, csr, worker_id, hashlib.sha256(public_der(private)).hexdigest())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
