"""Each virtual client's own model over one loaded base: loaded once per kind of site, its frozen weights shared.

Sites train side by side, so each needs its own trainable state (the adapter; in mode full every weight), its
own tokenizer (a fast tokenizer is not safe to call from two threads at once) and its own optimizer. The frozen
base weights, nearly all of a LoRA or QLoRA model's memory, are read by every site's forward pass and written by
none, so every site's copy shares them with the loaded model, which no site trains. The daemon writes its global
state into its copy before every task that touches it, as a deployed worker does into the model it loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import structlog
import torch

from fedlora_common.plans import RunSpec
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model

__all__ = ["SiteModels", "own_copy"]

log = structlog.get_logger()


def own_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy of `loaded` that shares its frozen base parameters and owns everything a site changes."""
    memo: dict[int, Any] = {
        id(param): param
        for name, param in loaded.model.named_parameters()
        if not param.requires_grad and "lora_" not in name  # FFA's frozen A is global state: each site writes it
    }
    return dataclasses.replace(
        loaded,
        model=copy.deepcopy(loaded.model, memo),
        tokenizer=copy.deepcopy(loaded.tokenizer),
        held=copy.deepcopy(loaded.held),
    )


class SiteModels:
    """Loads each kind of site's model (`SiteModel`: path, device, precision, rank) once, and hands every site its
    own copy of it. `loading` is held while a model loads: loading seeds torch's global generator (the adapter's
    initial weights), which training that draws randomness holds too (`side_by_side.SideBySide`)."""

    def __init__(
        self,
        *,
        load: Callable[[RunSpec, SiteModel], LoadedModel] = load_model,
        loading: threading.Lock | None = None,
    ) -> None:
        self._load = load
        self._loading = loading or threading.Lock()
        self._loaded: dict[SiteModel, LoadedModel] = {}
        self.loads = 0

    def load(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        """The site's own copy; ValueError for a run other than the one loaded for."""
        with self._loading:
            loaded = self._loaded.get(site)
            if loaded is None:
                log.info("loading_base_model_for_sites", path=site.path, device=site.device, mode=run.mode)
                loaded = self._loaded[site] = self._load(run, site)
                self.loads += 1
            if run != loaded.run:
                raise ValueError(f"the sites' models were loaded for run {loaded.run.run_id!r}, not {run.run_id!r}")
            with torch.no_grad():
                return own_copy(loaded)
