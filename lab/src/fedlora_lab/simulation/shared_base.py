"""One loaded base model for every virtual client: loaded once, never reloaded.

Each client's daemon asks for its model through the `load` hook of `fedlora_worker.daemon.Worker`
and gets the one model (every site must name the same base model, device and dtype). Before every task that touches the model the daemon writes its global state into it
(`set_global_state`: the adapter, or in mode full every weight) and trains from there, so clients
taking turns never see each other's local state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from fedlora_common.plans import RunSpec
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model

__all__ = ["SharedBase"]

log = structlog.get_logger()


class SharedBase:
    """Loads the run's base model on the first request and hands every later one the same model."""

    def __init__(
        self,
        *,
        load: Callable[[RunSpec, SiteModel], LoadedModel] = load_model,
        loading: threading.Lock | None = None,
    ) -> None:
        self._load = load
        self._loading = loading or threading.Lock()
        self._loaded: LoadedModel | None = None
        self.loads = 0

    def load(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        """The shared model; ValueError for another run or another base model."""
        with self._loading:
            if self._loaded is None:
                log.info("loading_shared_base_model", path=site.path, device=site.device, mode=run.mode)
                self._loaded = self._load(run, site)
                self.loads += 1
                return self._loaded
            first = self._loaded
        if run != first.run:
            raise ValueError(f"the shared model was loaded for run {first.run.run_id!r}, not {run.run_id!r}")
        if site != first.site:
            raise ValueError(f"site model {site} differs from the shared one ({first.site})")
        return first
