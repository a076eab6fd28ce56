"""The pieces of record-level DP-SGD that the training loop needs: records, Poisson draws, Opacus.

The privacy unit is a record. ``data.tokenize`` cuts a long record into windows that overlap by
one token; under DP all of a record's windows are drawn together and their per-window gradients
are summed into one per-record gradient before clipping, so a record moves the update by at most
the clip norm however long it is.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora_common.plans import RecordDPPlan
from fedlora_worker.data import TokenizedData

__all__ = ["dp_optimizer", "draw_records", "merge_grad_samples", "record_windows", "secret_generator"]

# Attributes Opacus leaves on modules and parameters that its own cleanup does not remove.
_MODULE_LEFTOVERS = ("activations", "max_batch_len")
_PARAM_LEFTOVERS = ("summed_grad",)


def record_windows(data: TokenizedData) -> list[list[int]]:
    """Window indices grouped by record, recovered from how ``tokenize`` cuts records.

    A window continues the previous one when that one is full length (the longest window, which is
    max_seq_len whenever any record was cut) and ends with the token and label this one starts with.
    A cut record always satisfies this, so a record is never split across groups; two records are
    merged only if one ends exactly where a window ends and the next starts with its last token,
    which only makes the privacy unit larger.
    """
    full = max((len(row) for row in data.input_ids), default=0)
    groups: list[list[int]] = []
    for i, row in enumerate(data.input_ids):
        previous = data.input_ids[i - 1] if i else []
        continues = len(previous) == full and previous[-1] == row[0] and data.labels[i - 1][-1] == data.labels[i][0]
        if continues:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS, for Poisson draws and noise.

    Never derive these from the round's seed: the coordinator chooses it, and knowing the draws or
    the noise would let it undo the noise and void the amplification by sampling.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def draw_records(count: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Poisson sampling: each record independently with probability sample_rate; may be empty."""
    return torch.nonzero(torch.rand(count, generator=generator) < sample_rate).flatten().tolist()


def merge_grad_samples(params: Sequence[torch.nn.Parameter], owner: torch.Tensor, records: int) -> None:
    """Sum Opacus' per-window gradients (row i belongs to record owner[i]) into per-record ones.

    With records == 0 (an empty draw) every parameter gets an empty batch of gradients, which the
    DP optimizer turns into a step of pure noise.
    """
    for p in params:
        empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        rows: torch.Tensor = p.grad_sample if records else empty  # type: ignore[attr-defined]
        merged = torch.zeros((records, *p.shape), dtype=rows.dtype, device=rows.device)
        p.grad_sample = merged.index_add_(0, owner.to(rows.device), rows)  # type: ignore[attr-defined]


@contextlib.contextmanager
def dp_optimizer(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    plan: RecordDPPlan,
    *,
    learning_rate: float,
    expected_batch_size: int,
    generator: torch.Generator,
) -> Iterator[DPOptimizer]:
    """AdamW behind Opacus' clipping and noise, with per-sample gradient hooks on model while open.

    Noise of std plan.noise_multiplier * plan.max_grad_norm goes onto the sum of per-record
    gradients, each clipped to plan.max_grad_norm. The loss to backpropagate is the sum of per-record losses (loss_reduction "sum" for the hooks,
    so each per-sample gradient is that record's own); the optimizer then divides the noised sum by
    expected_batch_size ("mean"), as DP-SGD with Poisson sampling prescribes. On exit every hook
    and attribute Opacus added is removed and the gradients are cleared: the daemon reuses model
    for evaluation and the next round.
    """
    backward_flags = {module: module._is_full_backward_hook for module in model.modules()}
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        yield DPOptimizer(
            torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
    finally:
        sampled._close()
        for module, flag in backward_flags.items():
            module._is_full_backward_hook = flag
            for name in _MODULE_LEFTOVERS:
                if name in vars(module):
                    delattr(module, name)
        for p in params:
            for name in _PARAM_LEFTOVERS:
                if hasattr(p, name):
                    delattr(p, name)
            p.grad = None
