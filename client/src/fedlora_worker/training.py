"""The local training loop and the held-out evaluation: short and linear, to be read in one sitting."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora_common.plans import GoldfishPlan, RecordDPPlan, TrainingPlan
from fedlora_worker.data import IGNORE_INDEX, Batch, TokenizedData, batches, collate
from fedlora_worker.dp_sgd import dp_optimizer, draw_records, merge_grad_samples, record_windows, secret_generator
from fedlora_worker.goldfish import goldfish_mask

__all__ = [
    "EvalResult",
    "TrainResult",
    "causal_lm_loss",
    "evaluate",
    "token_losses",
    "train_locally",
]


@dataclass(frozen=True)
class TrainResult:
    """mean_loss is token-weighted; tokens counts the non-padding tokens the model processed.

    sample_rate is the Poisson rate q of DP-SGD (0 without DP): with steps and the noise multiplier
    it is what a record-level privacy accountant needs.
    """

    mean_loss: float
    steps: int
    tokens: int
    seconds: float
    sample_rate: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    tokens: int


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy per target, (batch, seq - 1), zero where not counted; and the counted mask.

    Position t predicts label t+1. A token counts unless its label is IGNORE_INDEX or loss_mask
    (same shape as labels, True = counts) excludes it: the seam where Goldfish loss plugs in.
    """
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    if loss_mask is not None:
        counted = counted & loss_mask[:, 1:].to(device=counted.device, dtype=torch.bool)
    per_token = F.cross_entropy(  # in float32: a bf16 softmax over a large vocabulary loses the tail
        logits[:, :-1].flatten(0, 1).float(), targets.masked_fill(~counted, 0).flatten(), reduction="none"
    )
    return per_token.view_as(targets) * counted, counted


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross entropy over counted tokens (see token_losses), and how many were counted."""
    losses, counted = token_losses(logits, labels, loss_mask=loss_mask)
    count = int(counted.sum())
    return losses.sum() / max(count, 1), count


def _loss_mask(batch: Batch, goldfish: GoldfishPlan | None) -> torch.Tensor | None:
    if goldfish is None:
        return None
    return goldfish_mask(batch.input_ids, goldfish)


@dataclass(frozen=True)
class _Step:
    loss: float
    counted: int
    tokens: int


def train_locally(
    model: torch.nn.Module,
    data: TokenizedData,
    plan: TrainingPlan,
    *,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    dp_generator: torch.Generator | None = None,
) -> TrainResult:
    """Take plan.local_steps AdamW steps on the trainable parameters; on_step(step, loss) after each.

    The optimizer is fresh each call (a round starts from the new global state) and has no weight
    decay, which would pull the update towards zero rather than towards the site's data. Batch order
    and dropout are seeded from plan.seed without touching the caller's random state. plan.goldfish
    leaves a hashed 1/k of the tokens out of the loss. plan.record_dp switches to record-level
    DP-SGD: batch_size becomes the expected number of records per Poisson draw, and each record's
    gradient is clipped to record_dp.max_grad_norm in place of grad_clip_norm on the batch's. The
    Poisson draws and the noise come from dp_generator, by default seeded from the OS (never from
    plan.seed, see dp_sgd.secret_generator); an empty draw reports a loss of nan.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    sample_rate = 0.0
    if plan.record_dp is None:
        steps = _plain_steps(model, data, plan, params, pad_id=pad_id)
    else:
        records = record_windows(data)
        if plan.batch_size > len(records):
            raise ValueError(f"batch_size {plan.batch_size} exceeds the {len(records)} records DP-SGD samples from")
        sample_rate = plan.batch_size / len(records)
        generator = dp_generator if dp_generator is not None else secret_generator()
        steps = _private_steps(
            model, data, records, sample_rate, plan, plan.record_dp, params, pad_id=pad_id, generator=generator
        )
    loss_sum, loss_tokens, tokens = 0.0, 0, 0
    started = time.perf_counter()
    model.train()
    rng = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)
    with rng, contextlib.closing(steps):  # closing: Opacus lets go of the model even if on_step raises
        torch.manual_seed(plan.seed)
        for number, step in enumerate(steps, start=1):
            loss_sum += step.loss * step.counted if step.counted else 0.0
            loss_tokens += step.counted
            tokens += step.tokens
            if on_step is not None:
                on_step(number, step.loss)
    model.eval()
    return TrainResult(
        mean_loss=loss_sum / max(loss_tokens, 1),
        steps=plan.local_steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        sample_rate=sample_rate,
    )


def _checked(loss: torch.Tensor, step: int) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}")
    return value


def _plain_steps(
    model: torch.nn.Module, data: TokenizedData, plan: TrainingPlan, params: list[torch.nn.Parameter], *, pad_id: int
) -> Generator[_Step]:
    """Shuffled full batches; the batch's token-mean loss; its gradient clipped to grad_clip_norm."""
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    stream = batches(
        data, batch_size=plan.batch_size, generator=torch.Generator().manual_seed(plan.seed), pad_id=pad_id
    )
    for step in range(1, plan.local_steps + 1):
        batch = next(stream).to(params[0].device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, counted = causal_lm_loss(logits, batch.labels, loss_mask=_loss_mask(batch, plan.goldfish))
        value = _checked(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip_norm)
        optimizer.step()
        yield _Step(value, counted, int(batch.attention_mask.sum()))


def _private_steps(
    model: torch.nn.Module,
    data: TokenizedData,
    records: list[list[int]],
    sample_rate: float,
    plan: TrainingPlan,
    dp: RecordDPPlan,
    params: list[torch.nn.Parameter],
    *,
    pad_id: int,
    generator: torch.Generator,
) -> Generator[_Step]:
    """DP-SGD: Poisson-drawn records, each record's own token-mean loss, per-record clip, noise.

    Raises if the parameters did not move, the symptom of Opacus hooks on modules other than the
    ones holding the optimizer's parameters (a fingerprint, so full fine-tuning needs no copy).
    """
    device = params[0].device
    before = _fingerprint(params)
    with dp_optimizer(
        model,
        params,
        dp,
        learning_rate=plan.learning_rate,
        expected_batch_size=plan.batch_size,
        generator=generator,
    ) as optimizer:
        for step in range(1, plan.local_steps + 1):
            chosen = draw_records(len(records), sample_rate, generator)
            rows = [window for record in chosen for window in records[record]]
            owner = torch.tensor(
                [i for i, record in enumerate(chosen) for _ in records[record]], dtype=torch.long, device=device
            )
            optimizer.zero_grad(set_to_none=True)
            result = _Step(math.nan, 0, 0)
            if rows:
                batch = collate(data, rows, pad_id=pad_id).to(device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                losses, counted = token_losses(logits, batch.labels, loss_mask=_loss_mask(batch, plan.goldfish))
                per_record = torch.zeros(len(chosen), device=device)
                sums = per_record.index_add(0, owner, losses.sum(dim=1))
                counts = per_record.index_add(0, owner, counted.sum(dim=1).float())
                result = _Step(
                    _checked(sums.sum() / counts.sum().clamp(min=1), step),
                    int(counts.sum()),
                    int(batch.attention_mask.sum()),
                )
                (sums / counts.clamp(min=1)).sum().backward()  # type: ignore[no-untyped-call]
            merge_grad_samples(params, owner, len(chosen))
            optimizer.step()
            yield result
    if torch.equal(_fingerprint(params), before):
        raise RuntimeError("DP-SGD left the trainable parameters unchanged: per-sample gradients missed them")


def _fingerprint(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.stack([p.detach().double().square().sum() for p in params])


def evaluate(model: torch.nn.Module, data: TokenizedData, *, batch_size: int, pad_id: int) -> EvalResult:
    """Token-weighted mean loss over every window, in order, without gradients."""
    if not data.input_ids:
        raise ValueError("no token windows to evaluate")
    device = next(model.parameters()).device
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(data.input_ids), batch_size):
            indices = range(start, min(start + batch_size, len(data.input_ids)))
            batch = collate(data, indices, pad_id=pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, counted = causal_lm_loss(logits, batch.labels)
            loss_sum += loss.item() * counted
            tokens += counted
    return EvalResult(loss=loss_sum / max(tokens, 1), tokens=tokens)
