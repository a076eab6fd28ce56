"""The FedLoRA coordinator: `fedlora-server --config run.yaml`, or `CoordinatorServer` in a process of yours."""

from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.server import SERVICE_NAME, CoordinatorServer

__all__ = ["SERVICE_NAME", "Coordinator", "CoordinatorServer", "RunSettings"]
