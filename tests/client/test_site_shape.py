"""A site's own share of the run: the rank it trains (hetlora) and how it loads the base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bitsandbytes.nn.modules import Linear4bit

from fedlora_common.plans import LoraSpec, RunSpec
from fedlora_worker.modeling import SiteMismatch, SiteModel, global_state, load_model, set_global_state

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

LORA = LoraSpec(rank=8, alpha=16, dropout=0.0)


def _run(aggregation: str = "hetlora", mode: str = "lora", precisions: tuple[str, ...] = ()) -> RunSpec:
    return RunSpec(
        run_id="test-run",
        mode=mode,  # type: ignore[arg-type]
        aggregation=aggregation,  # type: ignore[arg-type]
        base_model="tiny-llama",
        lora=LORA,
        total_rounds=1,
        seed=3,
        base_precisions=precisions,  # type: ignore[arg-type]
    )


def _site(base: Path, **settings: object) -> SiteModel:
    return SiteModel(path=str(base), dtype="float32", **settings)  # type: ignore[arg-type]


def test_a_site_of_less_rank_starts_from_the_runs_seeded_adapter_and_sends_its_layout(tiny_base_model: Path) -> None:
    # Execute: the same run at a full-rank site and at a site that allows rank 2.
    full = load_model(_run(), _site(tiny_base_model))
    small = load_model(_run(), _site(tiny_base_model, max_rank=2))

    # Assert: one manifest (the run's rank), one initial state; the small site trains rank 2, alpha scaled.
    assert small.manifest == full.manifest
    assert small.rank == 2
    assert full.rank == 8
    start, small_start = global_state(full), global_state(small)
    assert all(np.array_equal(start[name], small_start[name]) for name in start)
    config = small.model.peft_config["default"]  # type: ignore[union-attr]
    assert (config.r, config.lora_alpha) == (2, 4.0)  # alpha / r stays the run's 16 / 8


def test_what_a_site_of_less_rank_did_not_train_comes_back_unchanged_and_what_it_did_moves(
    tiny_base_model: Path,
) -> None:
    # Prepare: a global state with every rank index set.
    small = load_model(_run(), _site(tiny_base_model, max_rank=2))
    rng = np.random.default_rng(0)
    state = {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in small.manifest.tensors}
    set_global_state(small, state)

    # Execute: change every trainable parameter, as a step of training would.
    with torch.no_grad():
        for param in small.model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    after = global_state(small)

    # Assert: A rows and B columns 2.. are bit-identical to the global state; the leading ones moved.
    for name, array in after.items():
        lead, rest = (np.s_[:2], np.s_[2:]) if "lora_A" in name else (np.s_[:, :2], np.s_[:, 2:])
        assert np.array_equal(array[rest], state[name][rest]), name
        assert np.allclose(array[lead], state[name][lead] + 1.0), name


def test_a_site_of_less_rank_is_refused_in_one_line_by_a_run_that_is_not_hetlora(tiny_base_model: Path) -> None:
    with pytest.raises(SiteMismatch) as caught:
        load_model(_run("fedavg"), _site(tiny_base_model, max_rank=4))

    assert str(caught.value) == (
        "lora.max_rank: 4, but this run trains rank 8 at every site; a site of less rank takes part only in a run "
        "with aggregation: hetlora"
    )


def test_a_site_may_load_the_base_in_nf4_in_a_lora_run_that_allows_it(tiny_base_model: Path) -> None:
    run = _run("fedavg", precisions=("nf4", "float32"))

    quantized = load_model(run, _site(tiny_base_model, base_precision="nf4"))
    plain = load_model(run, _site(tiny_base_model, base_precision="float32"))

    assert quantized.precision == "nf4"
    assert plain.precision == "float32"
    assert any(isinstance(m, Linear4bit) for m in quantized.model.modules())
    assert not any(isinstance(m, Linear4bit) for m in plain.model.modules())
    assert quantized.manifest == plain.manifest  # the same adapter travels


@pytest.mark.parametrize(
    ("mode", "precision", "allowed"),
    [("lora", "nf4", "bfloat16, float32"), ("qlora", "float32", "nf4")],
    ids=["nf4-in-a-lora-run", "float32-in-a-qlora-run"],
)
def test_a_precision_the_run_does_not_allow_is_refused_in_one_line(
    tiny_base_model: Path, mode: str, precision: str, allowed: str
) -> None:
    with pytest.raises(SiteMismatch) as caught:
        load_model(_run("fedavg", mode=mode), _site(tiny_base_model, base_precision=precision))

    assert str(caught.value) == (
        f"base_precision: {precision}, but this run allows {allowed} (run.yaml base_precisions); "
        "set one of them in worker.yaml"
    )
