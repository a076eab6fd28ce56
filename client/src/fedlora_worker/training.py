"""The local training loop and the held-out evaluation: short and linear, to be read in one sitting."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora_worker.data import IGNORE_INDEX, TokenizedData, batches, collate

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "causal_lm_loss", "evaluate", "train_locally"]


@dataclass(frozen=True)
class TrainConfig:
    """One round of local training; seed fixes batch order and dropout, so vary it from round to round."""

    local_steps: int
    batch_size: int
    learning_rate: float
    grad_clip_norm: float
    seed: int

    def __post_init__(self) -> None:
        for field in ("local_steps", "batch_size", "learning_rate", "grad_clip_norm"):
            if not getattr(self, field) > 0:  # a zero clip norm would silently zero every gradient
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")


@dataclass(frozen=True)
class TrainResult:
    """mean_loss is token-weighted; tokens counts the non-padding tokens the model processed."""

    mean_loss: float
    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    tokens: int


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross entropy over counted tokens, and how many were counted.

    Position t predicts label t+1. A token counts unless its label is IGNORE_INDEX or loss_mask
    (same shape as labels, True = counts) excludes it: the seam where Goldfish loss plugs in.
    """
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    if loss_mask is not None:
        counted = counted & loss_mask[:, 1:].to(torch.bool)
    per_token = F.cross_entropy(  # in float32: a bf16 softmax over a large vocabulary loses the tail
        logits[:, :-1].flatten(0, 1).float(), targets.masked_fill(~counted, 0).flatten(), reduction="none"
    )
    count = int(counted.sum())
    return (per_token * counted.flatten()).sum() / max(count, 1), count


def train_locally(
    model: torch.nn.Module,
    data: TokenizedData,
    config: TrainConfig,
    *,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Take config.local_steps AdamW steps on the trainable parameters; on_step(step, loss) after each.

    The optimizer is fresh each call (a round starts from the new global state) and has no weight
    decay, which would pull the update towards zero rather than towards the site's data. Batch order
    and dropout are seeded from config.seed without touching the caller's random state.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    stream = batches(
        data, batch_size=config.batch_size, generator=torch.Generator().manual_seed(config.seed), pad_id=pad_id
    )
    loss_sum, loss_tokens, tokens = 0.0, 0, 0
    started = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(config.seed)
        for step in range(1, config.local_steps + 1):
            batch = next(stream).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, counted = causal_lm_loss(logits, batch.labels)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
            optimizer.step()
            loss_sum += value * counted
            loss_tokens += counted
            tokens += int(batch.attention_mask.sum())
            if on_step is not None:
                on_step(step, value)
    model.eval()
    return TrainResult(
        mean_loss=loss_sum / max(loss_tokens, 1),
        steps=config.local_steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )


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
