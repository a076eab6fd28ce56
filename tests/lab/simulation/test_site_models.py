"""Each site's own model: loaded once per kind of site, frozen base weights shared, everything trained its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora_common.plans import LoraSpec, RunSpec
from fedlora_lab.model_factory import MadeModel
from fedlora_lab.simulation import SiteModels
from fedlora_worker.modeling import LoadedModel, SiteModel, global_state, load_model


def _spec(mode: str = "lora", run_id: str = "sim", aggregation: str = "fedavg") -> RunSpec:
    return RunSpec(
        run_id=run_id,
        mode=mode,  # type: ignore[arg-type]
        aggregation=aggregation,  # type: ignore[arg-type]
        base_model="base",
        lora=LoraSpec(rank=4),
        total_rounds=1,
        seed=0,
    )


class _CountingLoader:
    def __init__(self) -> None:
        self.calls: list[SiteModel] = []

    def __call__(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        self.calls.append(site)
        return load_model(run, site)


def _params(loaded: LoadedModel) -> dict[str, torch.nn.Parameter]:
    return dict(loaded.model.named_parameters())


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_each_site_gets_its_own_trainable_state_over_base_weights_loaded_once(lab_model: MadeModel, mode: str) -> None:
    loader = _CountingLoader()
    models = SiteModels(load=loader)
    site = SiteModel(path=str(lab_model.path))

    a, b = (models.load(_spec(mode), site) for _ in range(2))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = b.model(input_ids=ids).logits
        for param in _params(a).values():
            if param.requires_grad:
                param.add_(0.5)  # site a trains
        after = b.model(input_ids=ids).logits

    assert models.loads == len(loader.calls) == 1
    shared = [n for n, p in _params(a).items() if p is _params(b)[n]]
    trainable = [n for n, p in _params(a).items() if p.requires_grad]
    assert trainable
    assert not set(shared) & set(trainable)
    assert (len(shared) > 0) is (mode != "full")  # the frozen base: all but the adapter
    assert all(".lora_" not in n for n in shared)
    assert torch.equal(before, after)  # what a trains does not reach b
    assert a.tokenizer is not b.tokenizer
    assert a.manifest == b.manifest
    moved = [name for name, value in global_state(a).items() if not np.array_equal(value, global_state(b)[name])]
    assert moved == list(global_state(a))  # each site's global state is its own


def test_a_site_of_another_kind_loads_its_own_and_another_run_is_refused(lab_model: MadeModel) -> None:
    loader = _CountingLoader()
    models = SiteModels(load=loader)
    spec = _spec(aggregation="hetlora")

    full_rank = models.load(spec, SiteModel(path=str(lab_model.path)))
    low_rank = models.load(spec, SiteModel(path=str(lab_model.path), max_rank=2))

    assert (full_rank.rank, low_rank.rank) == (4, 2)
    assert models.loads == 2
    with pytest.raises(ValueError, match="not 'other'"):
        models.load(_spec(run_id="other", aggregation="hetlora"), SiteModel(path=str(lab_model.path)))
