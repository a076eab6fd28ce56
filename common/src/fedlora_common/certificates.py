"""When a PEM certificate file stops being valid: what both programs export, so an alert fires in time."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

__all__ = ["not_valid_after"]


def not_valid_after(path: Path) -> float:
    """The end of validity (Unix time) of the first certificate in `path`; ValueError if it holds none."""
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
