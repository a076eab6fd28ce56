"""Sites train at once, unless training draws from torch's one global generator: then one at a time, and the
result is each site's as if it trained alone."""

from __future__ import annotations

import threading
from collections.abc import Callable

import datasets
import torch

from fedlora_common.plans import LoraSpec, RunSpec, TrainingPlan
from fedlora_lab.model_factory import MadeModel
from fedlora_lab.simulation import SideBySide, SiteModels, draws_randomness
from fedlora_worker.data import TokenizedData, tokenize
from fedlora_worker.modeling import LoadedModel, SiteModel

PLAN = TrainingPlan(local_steps=6, batch_size=4, learning_rate=1e-2, max_seq_len=32, seed=3)


def _spec(dropout: float) -> RunSpec:
    return RunSpec(
        run_id="sim",
        mode="lora",
        aggregation="fedavg",
        base_model="base",
        lora=LoraSpec(rank=4, dropout=dropout),
        total_rounds=1,
        seed=0,
    )


def _sites(lab_model: MadeModel, dropout: float, count: int, *, attention_dropout: float = 0.0) -> list[LoadedModel]:
    """`count` sites' models, with LoRA dropout (a module) and attention dropout (a function, on torch's generator)."""
    models = SiteModels()
    sites = [models.load(_spec(dropout), SiteModel(path=str(lab_model.path))) for _ in range(count)]
    for loaded in sites:
        loaded.model.config.attention_dropout = attention_dropout
        for module in loaded.model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = attention_dropout
    return sites


def _data(loaded: LoadedModel, seed: int) -> TokenizedData:
    texts = [f"record {seed}-{i}: seen on day {(i * 7 + seed) % 31} for a follow up visit" for i in range(12)]
    return tokenize(datasets.Dataset.from_dict({"text": texts}), loaded.tokenizer, max_seq_len=32)


def _adapter(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}


def _at_once(trainer: SideBySide, sites: list[LoadedModel], on_step: Callable[[str, int], None]) -> list[str]:
    """Train every site in a thread of its own; the errors they raised."""
    errors: list[str] = []

    def work(name: str, loaded: LoadedModel, seed: int) -> None:
        try:
            trainer(loaded, _data(loaded, seed), PLAN, on_step=lambda step, loss: on_step(name, step))
        except Exception as exc:
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=work, args=(str(i), site, i)) for i, site in enumerate(sites)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def _trained_alone(trainer: SideBySide, sites: list[LoadedModel]) -> list[dict[str, torch.Tensor]]:
    for seed, loaded in enumerate(sites):
        trainer(loaded, _data(loaded, seed), PLAN, on_step=lambda step, loss: None)
    return [_adapter(loaded) for loaded in sites]


def _same(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return one.keys() == other.keys() and all(torch.equal(one[n], other[n]) for n in one)


def test_a_model_draws_from_torch_s_generator_through_a_dropout_of_its_own_never_a_site_s(
    lab_model: MadeModel,
) -> None:
    lora_dropout = _sites(lab_model, 0.1, 1)[0]
    attention_dropout = _sites(lab_model, 0.0, 1, attention_dropout=0.1)[0]
    stock_dropout = _sites(lab_model, 0.0, 1)[0]
    stock_dropout.model.add_module("extra", torch.nn.Dropout(0.2))

    assert not draws_randomness(lora_dropout.model)  # the worker gives every dropout module its own generator
    assert draws_randomness(attention_dropout.model)  # a rate in the model's config: a function call in attention
    assert draws_randomness(stock_dropout.model)


def test_sites_with_dropout_modules_train_at_the_same_time_each_as_if_alone(lab_model: MadeModel) -> None:
    trainer = SideBySide(threading.Lock())
    alone = _trained_alone(trainer, _sites(lab_model, 0.1, 2))
    together = _sites(lab_model, 0.1, 2)
    met = threading.Barrier(2, timeout=60)  # each site's first step waits for the other's: only at once do they meet

    def on_step(name: str, step: int) -> None:
        if step == 1:
            met.wait()

    errors = _at_once(trainer, together, on_step)

    assert errors == []
    assert all(_same(a, _adapter(t)) for a, t in zip(alone, together, strict=True))


def test_sites_whose_model_draws_from_torch_s_generator_train_one_at_a_time_each_as_if_alone(
    lab_model: MadeModel,
) -> None:
    trainer = SideBySide(threading.Lock())
    alone = _trained_alone(trainer, _sites(lab_model, 0.0, 2, attention_dropout=0.3))
    together = _sites(lab_model, 0.0, 2, attention_dropout=0.3)
    steps: list[str] = []

    errors = _at_once(trainer, together, lambda name, step: steps.append(name))

    assert errors == []
    one_then_other = ["0"] * PLAN.local_steps + ["1"] * PLAN.local_steps
    assert steps in (one_then_other, one_then_other[::-1])
    assert all(_same(a, _adapter(t)) for a, t in zip(alone, together, strict=True))
    assert not _same(alone[0], _trained_alone(trainer, _sites(lab_model, 0.0, 1))[0])  # attention dropout acts
