"""The FedLoRA worker: a daemon that trains on one site's records and ships only protected updates.

The public API is listed here; everything else is implementation. `fedlora_worker.audit` (the
memorization audit) and `fedlora_worker.protect` (the protection pipeline's steps) are public
modules with their own `__all__`. Names load on first use: the pipeline and the secure-aggregation
session are plain numpy, and the coordinator's tests and benchmarks that drive them should not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora_worker.config import WorkerSettings
    from fedlora_worker.coordinator import (
        Coordinator,
        DownloadedModel,
        NotJoined,
        StaleTask,
        TransferError,
        Unreachable,
    )
    from fedlora_worker.daemon import Worker, WorkerFailed, WorkerOutcome
    from fedlora_worker.metrics import WorkerMetrics
    from fedlora_worker.modeling import (
        LoadedModel,
        SiteModel,
        artifact_config_json,
        global_state,
        load_model,
        lora_config,
        set_global_state,
    )
    from fedlora_worker.training import EvalResult, TrainResult, evaluate, train_locally
    from fedlora_worker.transport import CoordinatorClient

_HOME = {
    "WorkerSettings": "config",
    "Coordinator": "coordinator",
    "DownloadedModel": "coordinator",
    "NotJoined": "coordinator",
    "StaleTask": "coordinator",
    "TransferError": "coordinator",
    "Unreachable": "coordinator",
    "Worker": "daemon",
    "WorkerFailed": "daemon",
    "WorkerOutcome": "daemon",
    "WorkerMetrics": "metrics",
    "LoadedModel": "modeling",
    "SiteModel": "modeling",
    "artifact_config_json": "modeling",
    "global_state": "modeling",
    "load_model": "modeling",
    "lora_config": "modeling",
    "set_global_state": "modeling",
    "EvalResult": "training",
    "TrainResult": "training",
    "evaluate": "training",
    "train_locally": "training",
    "CoordinatorClient": "transport",
}

__all__ = [
    "Coordinator",
    "CoordinatorClient",
    "DownloadedModel",
    "EvalResult",
    "LoadedModel",
    "NotJoined",
    "SiteModel",
    "StaleTask",
    "TrainResult",
    "TransferError",
    "Unreachable",
    "Worker",
    "WorkerFailed",
    "WorkerMetrics",
    "WorkerOutcome",
    "WorkerSettings",
    "artifact_config_json",
    "evaluate",
    "global_state",
    "load_model",
    "lora_config",
    "set_global_state",
    "train_locally",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fedlora_worker' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora_worker.{_HOME[name]}"), name)
