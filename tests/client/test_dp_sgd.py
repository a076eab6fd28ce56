from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import pytest
import torch
from pydantic import ValidationError
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedlora_common.plans import GoldfishPlan, LoraSpec, Mode, RecordDPPlan, TrainingPlan
from fedlora_worker.data import TokenizedData, tokenize
from fedlora_worker.dp_sgd import record_windows
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.training import evaluate, token_losses, train_locally

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

NO_DROPOUT = LoraSpec(rank=4, alpha=8, dropout=0.0)  # so a hand-computed gradient is exact


@pytest.fixture
def load(load_tiny: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
    def load(mode: Mode = "lora") -> LoadedModel:
        return load_tiny(mode, lora=NO_DROPOUT)

    return load


def dp_plan(steps: int, batch_size: int, noise: float, clip: float, **kwargs: Any) -> TrainingPlan:
    dp = RecordDPPlan(noise_multiplier=noise, max_grad_norm=clip)
    return TrainingPlan(
        local_steps=steps, batch_size=batch_size, learning_rate=1e-2, grad_clip_norm=1.0, seed=0, record_dp=dp, **kwargs
    )


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def sentences(load: Callable[..., LoadedModel], make_sentences: Callable[[int, int], list[str]]) -> TokenizedData:
    """Eight one-window records."""
    tokenizer = load().tokenizer
    return tokenize(datasets.Dataset.from_dict({"text": make_sentences(8, 3)}), tokenizer, max_seq_len=64)


@pytest.fixture
def adam_steps() -> Iterator[list[dict[str, Any]]]:
    """What AdamW sees at each DP step: per-record gradients, their clipped sum and the final gradient."""
    seen: list[dict[str, Any]] = []

    def capture(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not isinstance(optimizer, torch.optim.AdamW):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append(
            {
                "records": params[0].grad_sample.shape[0],
                "per_record": torch.cat([p.grad_sample.flatten(1) for p in params], dim=1).clone(),
                "summed": torch.cat([p.summed_grad.flatten() for p in params]).clone(),
                "grad": [p.grad.detach().clone() for p in params],
            }
        )

    handle = register_optimizer_step_pre_hook(capture)
    yield seen
    handle.remove()


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_dp_sgd_moves_every_adapter_tensor_and_reports_the_sample_rate(
    load: Callable[..., LoadedModel], sentences: TokenizedData, mode: Mode
) -> None:
    loaded = load(mode)
    before = adapter(loaded.model)
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad}

    result = train_locally(loaded.model, sentences, dp_plan(3, 2, 1.0, 1.0), pad_id=loaded.pad_id)

    after = dict(loaded.model.named_parameters())
    assert before
    assert all(".lora_" in name for name in before)
    assert all(not torch.equal(after[n], t) for n, t in before.items())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    assert result.sample_rate == 2 / 8
    assert result.steps == 3


def test_each_records_gradient_is_clipped_to_the_norm(
    load: Callable[..., LoadedModel], sentences: TokenizedData, adam_steps: list[dict[str, Any]]
) -> None:
    loaded = load()
    clip = 1e-3

    train_locally(loaded.model, sentences, dp_plan(12, 1, 1e-9, clip), pad_id=loaded.pad_id, dp_generator=seeded())

    single = [s for s in adam_steps if s["records"] == 1]
    assert len(adam_steps) == 12
    assert single  # q = 1/8: about 4 of 12 draws hold exactly one record (seeded: fixed)
    for s in single:
        assert float(s["per_record"].norm()) > 10 * clip  # unclipped: the test could fail
        assert float(s["summed"].norm()) <= clip * (1 + 1e-5)
    for s in adam_steps:
        assert float(s["summed"].norm()) <= s["records"] * clip * (1 + 1e-5)


def test_an_empty_draw_is_a_step_of_pure_noise(
    load: Callable[..., LoadedModel], sentences: TokenizedData, adam_steps: list[dict[str, Any]]
) -> None:
    loaded = load()
    losses: list[float] = []

    train_locally(
        loaded.model,
        sentences,
        dp_plan(12, 1, 1.0, 1.0),
        pad_id=loaded.pad_id,
        on_step=lambda _, v: losses.append(v),
        dp_generator=seeded(),
    )

    empty = [i for i, s in enumerate(adam_steps) if s["records"] == 0]
    assert empty  # (7/8)^8 = 34% of draws are empty
    for i in empty:
        assert math.isnan(losses[i])
        assert float(adam_steps[i]["summed"].norm()) == 0.0
        assert all(float(g.norm()) > 0 for g in adam_steps[i]["grad"])


def test_the_update_is_the_mean_of_clipped_per_record_gradients(
    load: Callable[..., LoadedModel], make_sentences: Callable[[int, int], list[str]], adam_steps: list[dict[str, Any]]
) -> None:
    loaded = load()
    long, short = " ".join(make_sentences(4, 5)), make_sentences(1, 6)[0]
    data = tokenize(datasets.Dataset.from_dict({"text": [long, short]}), loaded.tokenizer, max_seq_len=24)
    records = record_windows(data)
    assert len(records) == 2
    assert len(records[0]) >= 2  # the long record spans windows
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    loaded.model.train()
    expected = []
    for windows in records:  # each record's own token-mean loss over all its windows
        total, count = torch.zeros(()), 0
        for w in windows:
            ids = torch.tensor([data.input_ids[w]])
            losses, counted = token_losses(loaded.model(input_ids=ids).logits, torch.tensor([data.labels[w]]))
            total, count = total + losses.sum(), count + int(counted.sum())
        expected.append(torch.autograd.grad(total / count, params))
    norms = [float(torch.cat([g.flatten() for g in grads]).norm()) for grads in expected]
    clip = math.sqrt(norms[0] * norms[1])  # between the two: one record is clipped, one is not
    factors = [min(1.0, clip / (n + 1e-6)) for n in norms]

    train_locally(loaded.model, data, dp_plan(1, 2, 1e-9, clip), pad_id=loaded.pad_id, dp_generator=seeded())

    (step,) = adam_steps
    assert step["records"] == 2  # q = 2/2: both records every step
    for i, grad in enumerate(step["grad"]):
        mean = (factors[0] * expected[0][i] + factors[1] * expected[1][i]) / 2
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-7)


def test_dp_training_leaves_no_opacus_trace_and_the_model_works_after(
    load: Callable[..., LoadedModel], sentences: TokenizedData
) -> None:
    loaded = load()
    modules = {name: dict(vars(m)).keys() for name, m in loaded.model.named_modules()}
    params = {name: dict(vars(p)).keys() for name, p in loaded.model.named_parameters()}

    train_locally(loaded.model, sentences, dp_plan(2, 2, 1.0, 1.0), pad_id=loaded.pad_id)

    for name, m in loaded.model.named_modules():
        assert vars(m).keys() == modules[name], name
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
        assert not m._backward_hooks, name
        assert not m._is_full_backward_hook, name
    for name, p in loaded.model.named_parameters():
        assert vars(p).keys() == params[name], name
        assert p.grad is None
    assert math.isfinite(evaluate(loaded.model, sentences, batch_size=4, pad_id=loaded.pad_id).loss)
    again = train_locally(loaded.model, sentences, dp_plan(2, 2, 1.0, 1.0), pad_id=loaded.pad_id)
    plain = train_locally(
        loaded.model,
        sentences,
        TrainingPlan(local_steps=2, batch_size=2, learning_rate=1e-2, grad_clip_norm=1.0, seed=0),
        pad_id=loaded.pad_id,
    )
    assert math.isfinite(again.mean_loss)
    assert math.isfinite(plain.mean_loss)


def test_goldfish_and_dp_together_train(load: Callable[..., LoadedModel], sentences: TokenizedData) -> None:
    loaded = load()
    before = adapter(loaded.model)
    config = dp_plan(3, 2, 1.0, 1.0, goldfish=GoldfishPlan(k=2, h=2))

    result = train_locally(loaded.model, sentences, config, pad_id=loaded.pad_id)

    assert math.isfinite(result.mean_loss)
    assert all(not torch.equal(p, before[n]) for n, p in loaded.model.named_parameters() if p.requires_grad)


def test_draws_and_noise_are_secret_unless_a_generator_is_given(
    load: Callable[..., LoadedModel], sentences: TokenizedData
) -> None:
    runs = []
    for generator in (None, None, seeded(), seeded()):
        loaded = load()
        train_locally(loaded.model, sentences, dp_plan(2, 2, 1.0, 1.0), pad_id=loaded.pad_id, dp_generator=generator)
        runs.append(adapter(loaded.model))

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[n], b[n]) for n in a)

    assert not same(runs[0], runs[1])  # the same config.seed, which the coordinator knows
    assert same(runs[2], runs[3])


def test_record_windows_recovers_the_records_tokenize_cut(
    load: Callable[..., LoadedModel], make_sentences: Callable[[int, int], list[str]]
) -> None:
    tokenizer = load().tokenizer
    texts = [" ".join(make_sentences(n, n)) for n in (1, 5, 2, 9, 1, 3)]
    rows = [
        {"prompt": " ".join(make_sentences(3, 1)), "completion": make_sentences(1, 2)[0]},
        {"prompt": "hi", "completion": " ".join(make_sentences(4, 3))},
    ]

    for ds in (datasets.Dataset.from_dict({"text": texts}), datasets.Dataset.from_list(rows)):
        data = tokenize(ds, tokenizer, max_seq_len=16)
        sizes = [len(tokenize(ds.select([i]), tokenizer, max_seq_len=16).input_ids) for i in range(len(ds))]

        assert [len(group) for group in record_windows(data)] == sizes
        assert max(sizes) > 1


@pytest.mark.parametrize("field", ["noise_multiplier", "max_grad_norm"])
def test_non_positive_dp_settings_are_rejected_naming_the_field(field: str) -> None:
    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n  Input should be greater than 0"):
        RecordDPPlan.model_validate({"noise_multiplier": 1.0, "max_grad_norm": 1.0, field: 0.0})


def test_a_batch_larger_than_the_records_is_rejected(
    load: Callable[..., LoadedModel], sentences: TokenizedData
) -> None:
    loaded = load()

    with pytest.raises(ValueError, match="batch_size 9 exceeds the 8 records"):
        train_locally(loaded.model, sentences, dp_plan(1, 9, 1.0, 1.0), pad_id=loaded.pad_id)
