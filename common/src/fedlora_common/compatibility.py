"""Which coordinators and workers can take part in one run together: the wire protocol's version.

The protocol version counts changes to what travels (messages, their meaning, the order of a round); the
software version (each distribution's release) is reported beside it for the operator. A coordinator admits
workers whose protocol it speaks, from `OLDEST_PROTOCOL` to `PROTOCOL`, and refuses any other naming both
sides' versions; an upgrade that keeps the protocol can roll out site by site between rounds.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["OLDEST_PROTOCOL", "PROTOCOL", "incompatibility", "software_version"]

PROTOCOL = 1
"""This release's protocol. 1: the protocol of fedlora 0.1 (a worker that sends none speaks it)."""
OLDEST_PROTOCOL = 1
"""The oldest protocol a coordinator of this release still admits."""


def software_version() -> str:
    """This installation's release (the fedlora-common distribution's version)."""
    try:
        return metadata.version("fedlora-common")
    except metadata.PackageNotFoundError:
        return "unknown"


def incompatibility(worker_protocol: int, worker_software: str) -> str | None:
    """Why a worker speaking `worker_protocol` cannot take part in this coordinator's run, or None if it can."""
    protocol = worker_protocol or 1  # sent by every release since protocol 1; absent only from fedlora 0.1
    if OLDEST_PROTOCOL <= protocol <= PROTOCOL:
        return None
    return (
        f"the worker speaks protocol {protocol} (fedlora {worker_software or 'unknown'}), the coordinator "
        f"protocols {OLDEST_PROTOCOL}-{PROTOCOL} (fedlora {software_version()}): upgrade the "
        f"{'coordinator' if protocol > PROTOCOL else 'worker'}"
    )
