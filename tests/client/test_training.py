from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.nn.modules import Linear4bit
from pydantic import ValidationError

from fedlora_common.plans import LoraSpec, TrainingPlan
from fedlora_worker.data import IGNORE_INDEX, TokenizedData
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.training import causal_lm_loss, evaluate, train_locally

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
Load = Callable[..., LoadedModel]

LORA = LoraSpec(rank=4, alpha=8, dropout=0.05)
PLAN = TrainingPlan(local_steps=30, batch_size=4, learning_rate=1e-2, grad_clip_norm=1.0, seed=0)
SHORT = TrainingPlan(local_steps=4, batch_size=4, learning_rate=1e-2, grad_clip_norm=1.0, seed=0)


@pytest.fixture
def load(load_tiny: Load) -> Load:
    return partial(load_tiny, lora=LORA)


@pytest.fixture
def repeated(load: Load, make_sentences: Callable[[int, int], list[str]]) -> TokenizedData:
    """A handful of sentences, each several times: easy to fit in a few steps."""
    loaded = load("full")
    rows = [[1, *loaded.tokenizer.encode(s, add_special_tokens=False), 2] for s in make_sentences(4, 9)] * 3
    return TokenizedData(input_ids=rows, labels=[list(r) for r in rows])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}


def test_causal_lm_loss_scores_each_position_against_the_next_label() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3] = IGNORE_INDEX

    loss, counted = causal_lm_loss(logits, labels)

    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert counted == 2 * 4 - 1
    torch.testing.assert_close(loss, expected)


def test_causal_lm_loss_mask_drops_tokens_from_the_loss() -> None:
    logits = torch.randn(1, 6, 11)
    labels = torch.randint(0, 11, (1, 6))
    loss_mask = torch.tensor([[True, True, False, True, False, True]])

    loss, counted = causal_lm_loss(logits, labels, loss_mask=loss_mask)

    kept = torch.tensor([1, 3, 5])
    expected = F.cross_entropy(logits[0, kept - 1], labels[0, kept])
    assert counted == 3
    torch.testing.assert_close(loss, expected)


def test_training_lowers_the_loss_and_moves_only_the_adapter(load: Load, repeated: TokenizedData) -> None:
    loaded = load("lora")
    before = snapshot(loaded.model)
    initial = evaluate(loaded.model, repeated, batch_size=8, pad_id=loaded.pad_id)
    losses: list[tuple[int, float]] = []

    result = train_locally(
        loaded.model, repeated, PLAN, pad_id=loaded.pad_id, on_step=lambda s, v: losses.append((s, v))
    )
    final = evaluate(loaded.model, repeated, batch_size=8, pad_id=loaded.pad_id)

    assert final.loss < initial.loss - 1.0
    assert [step for step, _ in losses] == list(range(1, PLAN.local_steps + 1))
    assert all(math.isfinite(value) for _, value in losses)
    assert result.steps == PLAN.local_steps
    assert result.tokens > 0
    assert result.tokens_per_second > 0
    assert result.sample_rate == 0.0  # no DP-SGD, nothing for a record-level accountant
    moved = changed(before, loaded.model)
    assert moved == {name for name in before if ".lora_B." in name or ".lora_A." in name}
    assert not loaded.model.training


def test_ffa_training_moves_b_and_keeps_a(load: Load, repeated: TokenizedData) -> None:
    loaded = load("lora", aggregation="ffa")
    before = snapshot(loaded.model)

    train_locally(loaded.model, repeated, SHORT, pad_id=loaded.pad_id)

    moved = changed(before, loaded.model)
    assert moved == {name for name in before if ".lora_B." in name}


def test_qlora_training_keeps_the_4bit_base_weights(load: Load, repeated: TokenizedData) -> None:
    loaded = load("qlora")
    quantized = {n: m.weight.detach().clone() for n, m in loaded.model.named_modules() if isinstance(m, Linear4bit)}
    before = snapshot(loaded.model)

    train_locally(loaded.model, repeated, SHORT, pad_id=loaded.pad_id)

    modules = dict(loaded.model.named_modules())
    assert quantized
    assert all(torch.equal(modules[name].weight, weight) for name, weight in quantized.items())
    assert all(".lora_" in name for name in changed(before, loaded.model))


def test_full_training_lowers_the_loss(load: Load, repeated: TokenizedData) -> None:
    loaded = load("full")
    initial = evaluate(loaded.model, repeated, batch_size=8, pad_id=loaded.pad_id)

    train_locally(loaded.model, repeated, PLAN, pad_id=loaded.pad_id)

    assert evaluate(loaded.model, repeated, batch_size=8, pad_id=loaded.pad_id).loss < initial.loss - 1.0


def test_a_tiny_clip_norm_keeps_the_update_tiny(load: Load, repeated: TokenizedData) -> None:
    free, clipped = load("lora"), load("lora")
    before = snapshot(free.model)
    # Adam divides by sqrt(v) + 1e-8: gradients clipped far below eps leave steps ~1e4 times smaller.
    tiny = TrainingPlan(local_steps=4, batch_size=4, learning_rate=1e-2, grad_clip_norm=1e-12, seed=0)
    loose = TrainingPlan(local_steps=4, batch_size=4, learning_rate=1e-2, grad_clip_norm=1e3, seed=0)

    train_locally(free.model, repeated, loose, pad_id=free.pad_id)
    train_locally(clipped.model, repeated, tiny, pad_id=clipped.pad_id)

    def largest_move(model: torch.nn.Module) -> float:
        return max(float((t - before[n]).abs().max()) for n, t in model.state_dict().items())

    assert largest_move(free.model) > 1e-3
    assert largest_move(clipped.model) < 1e-5


@pytest.mark.parametrize("field", ["local_steps", "batch_size", "learning_rate", "grad_clip_norm"])
def test_non_positive_training_settings_are_rejected_naming_the_field(field: str) -> None:
    settings = {"local_steps": 1, "batch_size": 1, "learning_rate": 1e-3, "grad_clip_norm": 1.0, "seed": 0}

    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n  Input should be greater than"):
        TrainingPlan.model_validate({**settings, field: 0})


def test_training_is_reproducible_and_leaves_the_callers_rng_alone(load: Load, repeated: TokenizedData) -> None:
    first, second = load("lora"), load("lora")
    rng = torch.random.get_rng_state()

    one = train_locally(first.model, repeated, SHORT, pad_id=first.pad_id)
    two = train_locally(second.model, repeated, SHORT, pad_id=second.pad_id)

    assert torch.equal(torch.random.get_rng_state(), rng)
    assert one.mean_loss == two.mean_loss
    b = second.model.state_dict()
    assert all(torch.equal(tensor, b[name]) for name, tensor in first.model.state_dict().items())


def test_evaluation_is_token_weighted_and_blind_to_padding(load: Load, repeated: TokenizedData) -> None:
    loaded = load("lora")

    one_by_one = evaluate(loaded.model, repeated, batch_size=1, pad_id=loaded.pad_id)
    padded = evaluate(loaded.model, repeated, batch_size=5, pad_id=loaded.pad_id)

    assert one_by_one.tokens == padded.tokens == sum(len(row) - 1 for row in repeated.labels)
    assert padded.loss == pytest.approx(one_by_one.loss, rel=1e-5)
