"""The local training loop and the held-out evaluation: short and linear, to be read in one sitting."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fedlora_common.plans import GoldfishPlan, RecordDPPlan, TrainingPlan
from fedlora_worker.data import IGNORE_INDEX, Batch, TokenizedData, batches, collate
from fedlora_worker.dp_sgd import dp_optimizer, draw_records, merge_grad_samples, record_windows, secret_generator
from fedlora_worker.dropout import replay_on_recompute, seed_dropout
from fedlora_worker.goldfish import goldfish_mask
from fedlora_worker.packing import pack

__all__ = [
    "EvalResult",
    "Replicas",
    "TrainResult",
    "add_proximal_gradient",
    "causal_lm_loss",
    "check_plan",
    "evaluate",
    "learning_rate_at",
    "token_losses",
    "train_locally",
]


@dataclass(frozen=True)
class TrainResult:
    """mean_loss is token-weighted; tokens counts the non-padding tokens the model processed.

    sample_rate is the Poisson rate q of DP-SGD (0 without DP): with steps and the noise multiplier
    it is what a record-level privacy accountant needs. peak_memory_bytes is the most GPU memory
    torch had allocated at once while training (the largest over this site's devices), 0 on a CPU.
    """

    mean_loss: float
    steps: int
    tokens: int
    seconds: float
    sample_rate: float = 0.0
    peak_memory_bytes: int = 0

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


@dataclass(frozen=True)
class Replicas:
    """The processes that train one site together (`fedlora_worker.distributed`).

    Every process draws the same batches; process `rank` takes rows rank, rank + world_size, ...
    of each, and `model` (DistributedDataParallel around the trained model) averages the
    gradients, which each process scales so the average is the gradient of the whole batch.
    """

    model: Any
    rank: int
    world_size: int


def check_plan(plan: TrainingPlan, *, world_size: int = 1) -> None:
    """Refuse what this site cannot train as the plan says, in one line (the plan's own rules hold already)."""
    if plan.record_dp is not None and world_size > 1:
        raise ValueError(
            f"privacy.record_dp trains one process per site, not {world_size}: run this site without torchrun"
        )
    if plan.batch_size < world_size:
        raise ValueError(
            f"training.batch_size {plan.batch_size} leaves some of this site's {world_size} processes idle"
        )


def add_proximal_gradient(params: Sequence[torch.nn.Parameter], start: Sequence[torch.Tensor], mu: float) -> None:
    """Add mu * (w - w0) to each parameter's gradient: the gradient of FedProx's mu/2 * sum ||w - w0||^2
    (Li et al. 2020), w0 the parameters at the round's start.

    Written out rather than backpropagated, so it joins the data gradient however that was made
    (micro-batches, DDP's synchronised backward, Opacus' noised per-record sum); the term itself
    needs no graph. A parameter without a gradient gets the term alone.
    """
    with torch.no_grad():
        for p, w0 in zip(params, start, strict=True):
            pull = (p - w0).mul_(mu)
            p.grad = pull if p.grad is None else p.grad.add_(pull)


def _round_start(params: Sequence[torch.nn.Parameter], mu: float) -> list[torch.Tensor] | None:
    """FedProx's anchor w0: a detached copy of the trained parameters; None (no copy) when mu is 0."""
    return [p.detach().clone() for p in params] if mu > 0 else None


def learning_rate_at(plan: TrainingPlan, step: int) -> float:
    """The learning rate of the run's optimizer step `step` (from 0) on the plan's schedule.

    Warmup rises linearly over warmup_steps to learning_rate (its first step at 1/warmup_steps);
    then constant, or linear or cosine decay to min_lr_ratio x learning_rate over the remaining
    steps of the run (schedule_steps, else this round's local_steps).
    """
    total = plan.schedule_steps or plan.local_steps
    if step < plan.warmup_steps:
        return plan.learning_rate * (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, total - plan.warmup_steps)
    if plan.lr_schedule == "constant":
        return plan.learning_rate
    left = 1.0 - progress if plan.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return plan.learning_rate * (plan.min_lr_ratio + (1.0 - plan.min_lr_ratio) * max(0.0, left))


def train_locally(
    model: torch.nn.Module,
    data: TokenizedData,
    plan: TrainingPlan,
    *,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    dp_generator: torch.Generator | None = None,
    replicas: Replicas | None = None,
) -> TrainResult:
    """Take plan.local_steps AdamW steps on the trainable parameters; on_step(step, loss) after each.

    The optimizer is fresh each call (a round starts from the new global state) and has no weight
    decay, which would pull the update towards zero rather than towards the site's data. Its
    learning rate follows the run's schedule (learning_rate_at). Batch order and dropout are
    seeded from plan.seed without touching the caller's random state. Each step's batch is cut into
    micro-batches of micro_batch_size whose gradients add up to the batch's; with replicas, the
    processes of the site share each batch. plan.packing fills windows with whole short records;
    plan.gradient_checkpointing recomputes activations in the backward pass; plan.precision picks
    bf16 autocast. plan.goldfish leaves a hashed 1/k of the tokens out of the loss. plan.record_dp
    switches to record-level DP-SGD: batch_size becomes the expected number of records per Poisson
    draw, and each record's gradient is clipped to record_dp.max_grad_norm in place of
    grad_clip_norm on the batch's. The Poisson draws and the noise come from dp_generator, by
    default seeded from the OS (never from plan.seed, see dp_sgd.secret_generator); an empty draw
    reports a loss of nan. plan.proximal_mu > 0 adds FedProx's pull towards the parameters this
    call started from (add_proximal_gradient); the reported loss stays the data's.
    """
    world = replicas.world_size if replicas is not None else 1
    check_plan(plan, world_size=world)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = _input_device(model)
    if plan.packing:
        data = pack(data, plan.max_seq_len)
    start = _round_start(params, plan.proximal_mu)
    sample_rate = 0.0
    if plan.record_dp is None:
        steps = _plain_steps(model, data, plan, params, start, pad_id=pad_id, replicas=replicas)
    else:
        records = record_windows(data)
        if plan.batch_size > len(records):
            raise ValueError(f"batch_size {plan.batch_size} exceeds the {len(records)} records DP-SGD samples from")
        sample_rate = plan.batch_size / len(records)
        generator = dp_generator if dp_generator is not None else secret_generator()
        steps = _private_steps(
            model, data, records, sample_rate, plan, plan.record_dp, params, start, pad_id=pad_id, generator=generator
        )
    loss_sum, loss_tokens, tokens = 0.0, 0, 0
    _reset_peak_memory(model)
    started = time.perf_counter()
    model.train()
    rng = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)
    # closing: Opacus lets go of the model even if on_step raises
    with rng, _checkpointing(model, plan.gradient_checkpointing), contextlib.closing(steps):
        torch.manual_seed(plan.seed)  # what draws from the global generator: dropout a model computes in functions
        seed_dropout(model, plan.seed)  # its dropout modules: their own generator (`dropout`), seeded alike
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
        peak_memory_bytes=_peak_memory(model, replicas),
    )


def _checked(loss: torch.Tensor | float, step: int) -> float:
    value = loss.item() if isinstance(loss, torch.Tensor) else loss
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}")
    return value


def _plain_steps(
    model: torch.nn.Module,
    data: TokenizedData,
    plan: TrainingPlan,
    params: list[torch.nn.Parameter],
    start: list[torch.Tensor] | None,
    *,
    pad_id: int,
    replicas: Replicas | None,
) -> Generator[_Step]:
    """Shuffled full batches; the batch's token-mean loss, summed over micro-batches (and processes) so
    that their gradients add up to the batch's; FedProx's term added once the processes have averaged
    (it is the same in each), as if it were part of the loss; that gradient clipped to grad_clip_norm."""
    forward, rank, world = (model, 0, 1) if replicas is None else (replicas.model, replicas.rank, replicas.world_size)
    device = _input_device(model)
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    stream = batches(
        data, batch_size=plan.batch_size, generator=torch.Generator().manual_seed(plan.seed), pad_id=pad_id
    )
    for step in range(1, plan.local_steps + 1):
        batch = next(stream)  # the whole batch, drawn alike in every process
        loss_mask = _loss_mask(batch, plan.goldfish)
        counted = _counted(batch, loss_mask)  # the denominator of the batch's token-mean loss
        micro_batches = _micro_batches(batch, loss_mask, range(rank, len(batch.input_ids), world), plan)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for i, (micro, micro_mask) in enumerate(micro_batches):
            micro = micro.to(device)
            with _synced(replicas, last=i == len(micro_batches) - 1):
                losses, _ = _forward(forward, micro, micro_mask, plan)
                (losses.sum() * (world / max(counted, 1))).backward()  # type: ignore[no-untyped-call]
            loss_sum += losses.detach().sum()
        value = _checked(_summed(loss_sum, world) / max(counted, 1), step)
        if start is not None:
            add_proximal_gradient(params, start, plan.proximal_mu)
        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip_norm)
        _set_learning_rate(optimizer, learning_rate_at(plan, plan.schedule_start + step - 1))
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
    start: list[torch.Tensor] | None,
    *,
    pad_id: int,
    generator: torch.Generator,
) -> Generator[_Step]:
    """DP-SGD: Poisson-drawn records, each record's own token-mean loss, per-record clip, noise.

    The draw is cut into micro-batches of micro_batch_size records (all of a record's windows in
    one); each is clipped and summed by Opacus, which adds the noise once, after the last. Raises if
    the parameters did not move, the symptom of Opacus hooks on modules other than the ones holding
    the optimizer's parameters (a fingerprint, so full fine-tuning needs no copy).

    FedProx's term joins the gradient after the noise, unclipped: it depends on no record (w0 is the
    round's global model, w the result of noised steps), so adding it is post-processing and costs
    no privacy. Put into each record's loss instead, it would be clipped with that record's gradient
    (taking its share of the clip norm) and summed once per drawn record, no longer the gradient of
    mu/2 * ||w - w0||^2.
    """
    device = _input_device(model)
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
            size = plan.micro_batch_size or max(len(chosen), 1)
            parts = [chosen[i : i + size] for i in range(0, len(chosen), size)] or [[]]
            loss_sum, counted, tokens = 0.0, 0, 0
            for i, part in enumerate(parts):
                rows = [window for record in part for window in records[record]]
                owner = torch.tensor(
                    [j for j, record in enumerate(part) for _ in records[record]], dtype=torch.long, device=device
                )
                optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum of the parts before
                if rows:
                    batch = collate(data, rows, pad_id=pad_id).to(device)
                    losses, mask = _forward(model, batch, _loss_mask(batch, plan.goldfish), plan)
                    per_record = torch.zeros(len(part), device=device)
                    sums = per_record.index_add(0, owner, losses.sum(dim=1))
                    counts = per_record.index_add(0, owner, mask.sum(dim=1).float())
                    loss_sum += _checked(sums.sum(), step)
                    counted += int(counts.sum())
                    tokens += int(batch.attention_mask.sum())
                    (sums / counts.clamp(min=1)).sum().backward()  # type: ignore[no-untyped-call]
                merge_grad_samples(params, owner, len(part))
                optimizer.signal_skip_step(do_skip=i < len(parts) - 1)
                _set_learning_rate(optimizer, learning_rate_at(plan, plan.schedule_start + step - 1))
                if optimizer.pre_step():  # after the last part: clipped, summed, noised, averaged
                    if start is not None:
                        add_proximal_gradient(params, start, plan.proximal_mu)
                    optimizer.original_optimizer.step()
            yield _Step(loss_sum / counted if counted else math.nan, counted, tokens)
    if torch.equal(_fingerprint(params), before):
        raise RuntimeError("DP-SGD left the trainable parameters unchanged: per-sample gradients missed them")


def _forward(
    model: torch.nn.Module, batch: Batch, loss_mask: torch.Tensor | None, plan: TrainingPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_losses of a training forward (autocast as the plan says). The logits, a vocabulary-wide
    tensor no backward needs, are let go on return rather than held through the next forward."""
    with _autocast(plan, batch.input_ids.device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return token_losses(logits, batch.labels, loss_mask=loss_mask)


def _counted(batch: Batch, loss_mask: torch.Tensor | None) -> int:
    """Targets the batch's loss averages over: labels after the first, not IGNORE_INDEX, not masked out."""
    counted = batch.labels[:, 1:] != IGNORE_INDEX
    if loss_mask is not None:
        counted &= loss_mask[:, 1:].to(torch.bool)
    return int(counted.sum())


def _micro_batches(
    batch: Batch, loss_mask: torch.Tensor | None, rows: Sequence[int], plan: TrainingPlan
) -> list[tuple[Batch, torch.Tensor | None]]:
    """This process's rows of the batch in runs of micro_batch_size, each cut to its longest row."""
    rows = list(rows)
    size = plan.micro_batch_size or plan.batch_size
    out = []
    for start in range(0, len(rows), size):
        index = torch.tensor(rows[start : start + size])
        width = int(batch.attention_mask[index].sum(dim=1).max())
        part = Batch(*(t[index, :width] for t in (batch.input_ids, batch.attention_mask, batch.labels)))
        out.append((part, None if loss_mask is None else loss_mask[index, :width]))
    return out


def _synced(replicas: Replicas | None, *, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP averages the gradients across processes in the backward of the step's last micro-batch only."""
    if replicas is None or last:
        return contextlib.nullcontext()
    no_sync: contextlib.AbstractContextManager[Any] = replicas.model.no_sync()
    return no_sync


def _summed(value: torch.Tensor, world: int) -> float:
    """A sum over this site's processes (the value itself in a single process)."""
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def _autocast(plan: TrainingPlan, device: torch.device) -> torch.autocast:
    """bf16 autocast as plan.precision asks; auto: on CUDA devices that support bf16."""
    on = plan.precision == "bf16" or (
        plan.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """transformers' activation checkpointing of every block (non-reentrant: frozen inputs need no grad), for one call;
    a recomputed block draws the dropout masks its forward pass drew."""
    if not on:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    if enable is None or disable is None:
        raise ValueError(f"training.gradient_checkpointing: {type(model).__name__} cannot checkpoint activations")
    enable(activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": replay_on_recompute(model)})
    try:
        yield
    finally:
        disable()


def _set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch goes: the input embeddings' device (with device_map="auto", the first of several)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, torch.nn.Module):
        return next(embeddings.parameters()).device
    return next(model.parameters()).device


def _gpus(model: torch.nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _reset_peak_memory(model: torch.nn.Module) -> None:
    for device in _gpus(model):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(model: torch.nn.Module, replicas: Replicas | None) -> int:
    """The most memory torch allocated at once on any of this site's GPUs since the reset; 0 without one."""
    peak = max((torch.cuda.max_memory_allocated(device) for device in _gpus(model)), default=0)
    if replicas is not None and replicas.world_size > 1:
        value = torch.tensor(peak, dtype=torch.int64, device=_input_device(model))
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        peak = int(value)
    return peak


def _fingerprint(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.stack([p.detach().double().square().sum() for p in params])


def evaluate(model: torch.nn.Module, data: TokenizedData, *, batch_size: int, pad_id: int) -> EvalResult:
    """Token-weighted mean loss over every window, in order, without gradients."""
    if not data.input_ids:
        raise ValueError("no token windows to evaluate")
    device = _input_device(model)
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
