"""Which sites may train at once: all of them, unless training touches state torch keeps once per process.

Training seeds torch's global generator for the round (`fedlora_worker.training.train`); dropout draws from
it, and two sites drawing at once would draw each other's numbers. On an accelerator it resets and reads the
device's peak-memory counter, one per device. So a site whose model draws randomness while training, or that
trains on an accelerator, trains alone: it holds one lock, which loading a model holds too (it seeds the same
generator). Evaluation and the audit draw nothing from it and go on beside it. Everything else trains at once,
each site with the torch threads the process was given.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable

import torch

from fedlora_common.plans import TrainingPlan
from fedlora_worker.data import TokenizedData
from fedlora_worker.distributed import train_in_process
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.training import TrainResult

__all__ = ["SideBySide", "draws_randomness", "on_accelerator"]

_DROPOUT_WORDS = ("dropout", "pdrop")


def draws_randomness(model: torch.nn.Module) -> bool:
    """True if training `model` draws from torch's global generator: a dropout module, or a dropout rate in a
    model config (attention dropout is a functional call, not a module)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and value > 0 and any(word in key for word in _DROPOUT_WORDS):
                    return True
    return False


def on_accelerator(model: torch.nn.Module) -> bool:
    return any(param.device.type != "cpu" for param in model.parameters())


class SideBySide:
    """The daemons' trainer (`fedlora_worker.daemon.Worker`'s `train`): `train_in_process`, alone where it must be."""

    def __init__(self, alone: threading.Lock) -> None:
        self._alone = alone
        self._must_be_alone: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()

    def alone(self, loaded: LoadedModel) -> bool:
        """Whether this site's training must hold the lock (decided once per model)."""
        decided = self._must_be_alone.get(loaded.model)
        if decided is None:
            decided = self._must_be_alone[loaded.model] = draws_randomness(loaded.model) or on_accelerator(loaded.model)
        return decided

    def __call__(
        self, loaded: LoadedModel, data: TokenizedData, plan: TrainingPlan, *, on_step: Callable[[int, float], None]
    ) -> TrainResult:
        with self._alone if self.alone(loaded) else contextlib.nullcontext():
            return train_in_process(loaded, data, plan, on_step=on_step)
