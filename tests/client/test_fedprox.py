from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import pytest
import torch

from fedlora_common.plans import LoraSpec, TrainingPlan
from fedlora_worker import training
from fedlora_worker.data import TokenizedData, tokenize
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.training import add_proximal_gradient, train_locally

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
Load = Callable[..., LoadedModel]

LORA = LoraSpec(rank=4, alpha=8, dropout=0.05)
DP = {"record_dp": {"noise_multiplier": 0.5, "max_grad_norm": 1.0}}


@pytest.fixture
def sentences(load_tiny: Load, make_sentences: Callable[[int, int], list[str]]) -> TokenizedData:
    """Sixteen one-window records."""
    tokenizer = load_tiny("lora", lora=LORA).tokenizer
    return tokenize(datasets.Dataset.from_dict({"text": make_sentences(16, 3)}), tokenizer, max_seq_len=64)


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trained(load_tiny: Load, data: TokenizedData, **settings: Any) -> tuple[dict[str, torch.Tensor], ...]:
    """The seeded initial adapter and the adapter after 20 steps of `settings` (DP-SGD's draws and noise seeded)."""
    loaded = load_tiny("lora", lora=LORA)
    plan = TrainingPlan.model_validate(
        {"local_steps": 20, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, **settings}
    )
    start = adapter(loaded.model)
    generator = torch.Generator().manual_seed(5) if plan.record_dp is not None else None
    train_locally(loaded.model, data, plan, pad_id=loaded.pad_id, dp_generator=generator)
    return start, adapter(loaded.model)


def distance(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([(one[n] - other[n]).flatten() for n in sorted(one)]).norm())


def test_the_added_gradient_is_the_gradient_of_the_proximal_term() -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=generator)) for _ in range(2)]
    start = [torch.randn(3, 2, generator=generator) for _ in params]
    data_gradient = torch.randn(3, 2, generator=generator)
    params[0].grad = data_gradient.clone()  # the second has none yet
    mu = 0.3

    add_proximal_gradient(params, start, mu)

    term = mu / 2 * torch.stack([((p - w0) ** 2).sum() for p, w0 in zip(params, start, strict=True)]).sum()
    expected = torch.autograd.grad(term, params)
    torch.testing.assert_close(params[0].grad, data_gradient + expected[0])
    torch.testing.assert_close(params[1].grad, expected[1])
    torch.testing.assert_close(expected[1], mu * (params[1].detach() - start[1]))


@pytest.mark.parametrize("private", [False, True], ids=["plain", "record-dp"])
def test_fedprox_keeps_the_adapter_closer_to_the_round_start(
    load_tiny: Load, sentences: TokenizedData, private: bool
) -> None:
    settings = DP if private else {}
    start, free = trained(load_tiny, sentences, **settings)

    _, pulled = trained(load_tiny, sentences, proximal_mu=1.0, **settings)

    assert distance(free, start) > 0
    assert distance(pulled, start) < 0.8 * distance(free, start)


def test_mu_zero_trains_bit_identically_without_the_term(
    load_tiny: Load, sentences: TokenizedData, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, default = trained(load_tiny, sentences)

    def refuse(*args: object) -> None:
        raise AssertionError("mu = 0 computed FedProx's term")

    monkeypatch.setattr(training, "add_proximal_gradient", refuse)
    _, explicit = trained(load_tiny, sentences, proximal_mu=0.0)

    assert default.keys() == explicit.keys()
    assert all(torch.equal(default[n], explicit[n]) for n in default)
