"""The shared base model: loaded once for every virtual client, refused for another run or model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedlora_common.manifest import Manifest
from fedlora_common.plans import LoraSpec, RunSpec
from fedlora_lab.simulation.shared_base import SharedBase
from fedlora_worker.modeling import LoadedModel, SiteModel


def _spec(run_id: str = "sim") -> RunSpec:
    return RunSpec(
        run_id=run_id, mode="lora", aggregation="fedavg", base_model="base", lora=LoraSpec(), total_rounds=1, seed=0
    )


class _CountingLoader:
    def __init__(self) -> None:
        self.calls: list[tuple[RunSpec, SiteModel]] = []

    def __call__(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        self.calls.append((run, site))
        tokenizer: Any = object()
        return LoadedModel(model=torch.nn.Linear(2, 2), tokenizer=tokenizer, run=run, site=site, manifest=Manifest(()))


def test_every_client_gets_the_one_model_loaded_once() -> None:
    loader = _CountingLoader()
    base = SharedBase(load=loader)
    site = SiteModel(path="base")

    models = [base.load(_spec(), site) for _ in range(3)]

    assert len(loader.calls) == 1
    assert base.loads == 1
    assert models[0] is models[1] is models[2]


def test_another_run_or_another_base_model_is_refused() -> None:
    base = SharedBase(load=_CountingLoader())
    base.load(_spec(), SiteModel(path="base"))

    with pytest.raises(ValueError, match="not 'other'"):
        base.load(_spec("other"), SiteModel(path="base"))
    with pytest.raises(ValueError, match="differs from the shared one"):
        base.load(_spec(), SiteModel(path="base", dtype="bfloat16"))
