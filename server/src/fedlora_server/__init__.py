"""The FedLoRA coordinator: `fedlora-server --config run.yaml`, or `CoordinatorServer` in a process of yours.

Names load on first use, so `fedlora-server check-config` and `--check` do not pay for the whole server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora_server.config import RunSettings
    from fedlora_server.coordinator import Coordinator
    from fedlora_server.server import SERVICE_NAME, CoordinatorServer

_HOME = {"RunSettings": "config", "Coordinator": "coordinator", "SERVICE_NAME": "server", "CoordinatorServer": "server"}

__all__ = ["SERVICE_NAME", "Coordinator", "CoordinatorServer", "RunSettings"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fedlora_server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora_server.{_HOME[name]}"), name)
