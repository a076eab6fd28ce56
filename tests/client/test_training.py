from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.nn.modules import Linear4bit
from opacus.optimizers import DPOptimizer
from pydantic import ValidationError
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedlora_common.plans import LoraSpec, RecordDPPlan, TrainingPlan
from fedlora_worker.data import IGNORE_INDEX, TokenizedData
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.packing import pack
from fedlora_worker.training import causal_lm_loss, check_plan, evaluate, learning_rate_at, train_locally

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


# ---- GPU-grade training: the same update, however the batch is cut or recomputed ---------------

NO_DROPOUT = LoraSpec(rank=4, alpha=8, dropout=0.0)
SAME_GRADIENT = 1e-6
"""Bound on |g' - g| / |g| for the first step's gradient (same parameters, same batch): summing it in
another order (micro-batches) changes it by float32 rounding, 1.3e-7 to 2.2e-7 measured here."""
SAME_UPDATE = 1e-5
"""Bound on |u' - u| / |u| for the update after 3 steps: 4.8e-7 to 5.1e-7 measured here. (With
duplicated records, Adam amplifies the rounding of near-zero gradients to ~8e-5, so these
tests train on distinct records.)"""


@pytest.fixture
def distinct(load: Load, make_sentences: Callable[[int, int], list[str]]) -> TokenizedData:
    """Twelve different sentences of 4 to 14 words."""
    tokenizer = load("full").tokenizer
    rows = [[1, *tokenizer.encode(s, add_special_tokens=False), 2] for s in make_sentences(12, 9)]
    return TokenizedData(input_ids=rows, labels=[list(r) for r in rows])


@dataclass(frozen=True)
class Trained:
    update: torch.Tensor
    """Every trainable tensor's change, flattened in name order."""
    gradients: list[torch.Tensor]
    """The gradient each optimizer step applied (after clipping), flattened."""


def trained(load: Load, data: TokenizedData, lora: LoraSpec = NO_DROPOUT, **settings: Any) -> Trained:
    """3 steps of `settings` from the seeded initial adapter (DP-SGD's draws and noise seeded too)."""
    loaded = load("lora", lora=lora)
    plan = TrainingPlan.model_validate(
        {"local_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, **settings}
    )
    generator = torch.Generator().manual_seed(5) if plan.record_dp is not None else None
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters() if p.requires_grad}
    gradients: list[torch.Tensor] = []

    def capture(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not isinstance(optimizer, DPOptimizer):  # DP-SGD: the AdamW inside sees the noised gradient
            gradients.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]))

    handle = register_optimizer_step_pre_hook(capture)
    try:
        train_locally(loaded.model, data, plan, pad_id=loaded.pad_id, dp_generator=generator)
    finally:
        handle.remove()
    after = dict(loaded.model.named_parameters())
    return Trained(torch.cat([(after[n].detach() - before[n]).flatten() for n in sorted(before)]), gradients)


def relative(other: torch.Tensor, one: torch.Tensor) -> float:
    return float((other - one).norm() / one.norm())


@pytest.mark.parametrize("micro_batch_size", [1, 3])  # 3: micro-batches of 3 and 1 windows
def test_accumulated_micro_batches_give_the_update_of_the_whole_batch(
    load_tiny: Load, distinct: TokenizedData, micro_batch_size: int
) -> None:
    whole = trained(load_tiny, distinct)

    accumulated = trained(load_tiny, distinct, micro_batch_size=micro_batch_size)

    assert float(whole.update.abs().max()) > 1e-2  # the update is not nothing
    assert len(accumulated.gradients) == 3
    assert relative(accumulated.gradients[0], whole.gradients[0]) < SAME_GRADIENT
    assert relative(accumulated.update, whole.update) < SAME_UPDATE


def test_activation_checkpointing_gives_the_same_update_bit_for_bit_even_with_dropout(
    load_tiny: Load, distinct: TokenizedData
) -> None:
    dropout = LoraSpec(rank=4, alpha=8, dropout=0.1)  # the recomputation replays the same masks

    stored = trained(load_tiny, distinct, dropout)
    recomputed = trained(load_tiny, distinct, dropout, gradient_checkpointing=True)
    both = trained(load_tiny, distinct, gradient_checkpointing=True, micro_batch_size=2)

    assert torch.equal(recomputed.update, stored.update)
    assert relative(both.update, trained(load_tiny, distinct).update) < SAME_UPDATE


def test_dp_sgd_micro_batches_clip_each_record_and_add_the_noise_once(load_tiny: Load, distinct: TokenizedData) -> None:
    dp = RecordDPPlan(noise_multiplier=1.0, max_grad_norm=1.0)

    whole = trained(load_tiny, distinct, record_dp=dp)
    accumulated = trained(load_tiny, distinct, record_dp=dp, micro_batch_size=1)

    assert relative(accumulated.gradients[0], whole.gradients[0]) < SAME_GRADIENT
    assert relative(accumulated.update, whole.update) < SAME_UPDATE


def test_activation_checkpointing_is_off_again_after_training(load: Load, repeated: TokenizedData) -> None:
    loaded = load("lora")
    plan = TrainingPlan(local_steps=1, batch_size=4, gradient_checkpointing=True, seed=0)

    train_locally(loaded.model, repeated, plan, pad_id=loaded.pad_id)

    assert not loaded.model.base_model.model.is_activation_checkpointing


@pytest.mark.parametrize(
    ("settings", "world_size", "named"),
    [
        ({"packing": True, "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}, 1, "training.packing"),
        (
            {"gradient_checkpointing": True, "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
            1,
            "training.gradient_checkpointing",
        ),
        ({"record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}, 2, "privacy.record_dp"),
        ({"batch_size": 2}, 4, "training.batch_size"),
    ],
)
def test_combinations_that_cannot_train_exactly_are_refused_naming_the_settings(
    settings: dict[str, Any], world_size: int, named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):  # by the plan's own rules, or the site's
        check_plan(TrainingPlan.model_validate({"seed": 0, **settings}), world_size=world_size)


def test_a_micro_batch_larger_than_the_batch_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"micro_batch_size: 16 exceeds batch_size 8"):
        TrainingPlan(batch_size=8, micro_batch_size=16, seed=0)


def test_precision_auto_is_float32_on_a_cpu_and_bf16_autocast_trains_close_to_it(
    load_tiny: Load, distinct: TokenizedData
) -> None:
    fp32 = trained(load_tiny, distinct, precision="fp32")

    auto = trained(load_tiny, distinct, precision="auto")
    bf16 = trained(load_tiny, distinct, precision="bf16")

    assert torch.equal(auto.update, fp32.update)
    assert not torch.equal(bf16.update, fp32.update)  # bf16 matmuls did run
    assert relative(bf16.gradients[0], fp32.gradients[0]) < 0.05  # bf16 keeps 8 bits of mantissa


# ---- the learning-rate schedule across rounds ----------------------------------------------------


def schedule(plan: TrainingPlan, rounds: int) -> list[float]:
    """The learning rates of every step of a run, round after round, as each round's plan places them."""
    return [
        learning_rate_at(
            plan.model_copy(
                update={"schedule_start": r * plan.local_steps, "schedule_steps": rounds * plan.local_steps}
            ),
            r * plan.local_steps + i,
        )
        for r in range(rounds)
        for i in range(plan.local_steps)
    ]


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor_over_the_whole_run() -> None:
    plan = TrainingPlan(
        local_steps=5, learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1, seed=0
    )

    rates = schedule(plan, rounds=4)  # 20 steps

    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0)  # decay starts at the peak
    assert all(a > b for a, b in itertools.pairwise(rates[4:]))
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert min(rates) > 0.1


def test_linear_decay_and_constant_schedules() -> None:
    linear = TrainingPlan(local_steps=4, learning_rate=2.0, lr_schedule="linear", seed=0)
    constant = TrainingPlan(local_steps=4, learning_rate=2.0, warmup_steps=2, seed=0)

    assert schedule(linear, rounds=2) == pytest.approx([2.0 * (1 - i / 8) for i in range(8)])
    assert schedule(constant, rounds=2) == pytest.approx([1.0, 2.0, *[2.0] * 6])


def test_each_step_takes_the_learning_rate_of_its_place_in_the_run(load: Load, repeated: TokenizedData) -> None:
    loaded = load("lora")
    plan = TrainingPlan(
        local_steps=3, batch_size=4, lr_schedule="linear", warmup_steps=2, schedule_start=6, schedule_steps=12, seed=0
    )
    seen: list[float] = []

    def capture(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        seen.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(capture)
    try:
        train_locally(loaded.model, repeated, plan, pad_id=loaded.pad_id)
    finally:
        handle.remove()

    assert seen == pytest.approx([learning_rate_at(plan, step) for step in (6, 7, 8)])
    assert seen == pytest.approx([plan.learning_rate * (1 - (s - 2) / 10) for s in (6, 7, 8)])


def test_packing_trains_on_fewer_rows_and_leaves_the_batch_order_seeded(load: Load, distinct: TokenizedData) -> None:
    plan = TrainingPlan(local_steps=2, batch_size=2, max_seq_len=128, packing=True, seed=0)
    first, second = load("lora"), load("lora")

    one = train_locally(first.model, distinct, plan, pad_id=first.pad_id)
    two = train_locally(second.model, distinct, plan, pad_id=second.pad_id)

    rows = pack(distinct, plan.max_seq_len).input_ids
    assert len(rows) <= len(distinct.input_ids) / 2
    assert one.mean_loss == two.mean_loss
    assert math.isfinite(one.mean_loss)
    assert one.tokens > 2 * 2 * min(len(row) for row in distinct.input_ids)  # two windows or more per row
    assert one.peak_memory_bytes == 0  # no GPU here
