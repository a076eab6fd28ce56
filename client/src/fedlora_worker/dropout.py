"""Dropout that draws from its model's own generator, not from torch's one generator per process.

Torch's dropout draws from the process's global generator, which training seeds each round. Two models that
train in one process at once (the lab's simulation engine trains every site in a thread of one process) would
draw each other's numbers. `SeededDropout` draws from a stream that belongs to its model: on the CPU it computes
what `torch.nn.functional.dropout` computes there (x times a Bernoulli(1 - p) mask divided by 1 - p, the mask
drawn by `bernoulli_`), so a stream seeded as the global generator was gives the same result bit for bit. On
an accelerator it is torch's fused dropout, on the global generator, as before. Activation checkpointing
replays the global generator when it recomputes a segment; `replay_on_recompute` replays the streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["DropoutStream", "SeededDropout", "own_dropout", "replay_on_recompute", "seed_dropout"]

Contexts = tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]


class DropoutStream:
    """The CPU generator every dropout of one model draws from, in the order the forward pass calls them."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)


class SeededDropout(torch.nn.Module):
    """`torch.nn.Dropout(p)` drawing from `stream` on the CPU."""

    def __init__(self, p: float, stream: DropoutStream) -> None:
        super().__init__()
        self.p = p
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.stream.generator)
        return x * keep.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def own_dropout(model: torch.nn.Module) -> int:
    """Replace every `torch.nn.Dropout` of `model` (peft's lora_dropout included) by a `SeededDropout` on one
    stream of the model's own; the number replaced."""
    stream = DropoutStream()
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout
    ]
    for parent, name, child in found:
        setattr(parent, name, SeededDropout(child.p, stream))
    return len(found)


def _streams(model: torch.nn.Module) -> list[DropoutStream]:
    """The streams `model`'s dropouts draw from (one, unless models were merged)."""
    return list({id(m.stream): m.stream for m in model.modules() if isinstance(m, SeededDropout)}.values())


def seed_dropout(model: torch.nn.Module, seed: int) -> None:
    for stream in _streams(model):
        stream.seed(seed)


def replay_on_recompute(model: torch.nn.Module) -> Callable[[], Contexts]:
    """`torch.utils.checkpoint`'s `context_fn` for `model`: a segment recomputed in the backward pass draws the
    masks its forward pass drew, and the streams then go on from where they were."""
    streams = _streams(model)

    def context_fn() -> Contexts:
        at_forward: list[torch.Tensor] = []

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            at_forward[:] = [stream.generator.get_state() for stream in streams]
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = [stream.generator.get_state() for stream in streams]
            for stream, state in zip(streams, at_forward, strict=True):
                stream.generator.set_state(state)
            try:
                yield
            finally:
                for stream, state in zip(streams, now, strict=True):
                    stream.generator.set_state(state)

        return forward(), recompute()

    return context_fn
