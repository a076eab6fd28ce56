"""Dropout on a model's own generator: torch's masks bit for bit, and no draw from the process's generator."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fedlora_common.plans import LoraSpec
from fedlora_worker.dropout import DropoutStream, SeededDropout, own_dropout, seed_dropout
from fedlora_worker.modeling import LoadedModel

Load = Callable[..., LoadedModel]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_masks_are_torch_s_own_from_a_generator_seeded_as_the_global_one(dtype: torch.dtype) -> None:
    x = torch.randn(4, 9, 32, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)
    expected = [F.dropout(x, 0.05, training=True), F.dropout(x * 2, 0.3, training=True)]
    stream = DropoutStream(11)
    got = [SeededDropout(0.05, stream)(x), SeededDropout(0.3, stream)(x * 2)]

    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    (grad_expected,) = torch.autograd.grad(sum(e.float().sum() for e in expected), x)
    (grad_got,) = torch.autograd.grad(sum(g.float().sum() for g in got), x)
    assert torch.equal(grad_expected, grad_got)


def test_it_draws_nothing_from_the_global_generator_and_nothing_in_eval() -> None:
    dropout = SeededDropout(0.5, DropoutStream(1))
    x = torch.ones(64)
    before = torch.random.get_rng_state()

    trained = dropout(x)
    dropout.eval()

    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(trained, x)
    assert dropout(x) is x


def test_a_loaded_model_keeps_no_torch_dropout_and_seeding_repeats_its_masks(load_tiny: Load) -> None:
    loaded = load_tiny("lora", lora=LoraSpec(rank=4, alpha=8, dropout=0.1))
    model = loaded.model
    model.train()
    with torch.no_grad():  # B starts at zero, where what dropout hides on the adapter's input cannot show
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    ids = torch.randint(0, 100, (2, 12))

    def logits(seed: int) -> torch.Tensor:
        seed_dropout(model, seed)
        return model(input_ids=ids).logits.detach()

    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, SeededDropout) for m in model.modules()) == 14  # every lora_dropout, 7 per layer
    assert len({id(m.stream) for m in model.modules() if isinstance(m, SeededDropout)}) == 1
    assert torch.equal(logits(3), logits(3))
    assert not torch.equal(logits(3), logits(4))
    assert own_dropout(model) == 0
