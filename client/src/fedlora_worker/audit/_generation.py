"""Greedy decoding and log-likelihood scoring, batched over token lists of different lengths.

Prompts are left-padded with explicit position ids, so a prompt decodes to the same tokens alone or
in any batch; batches are formed from length-sorted inputs to keep padding small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["greedy_decode", "log_likelihoods"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """Exactly ``max_new_tokens`` argmax tokens after each prompt, reusing the KV cache.

    End-of-sequence is not special: the audit compares fixed-length continuations, and a model that
    would stop early simply got those tokens wrong.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    device = _device(model)
    out: list[list[int]] = [[] for _ in prompts]
    for batch in _batches([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, width - len(prompts[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        steps = [result.logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
            positions = positions[:, -1:] + 1
            result = model(
                input_ids=steps[-1][:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=result.cache,
                use_cache=True,
            )
            steps.append(result.logits[:, -1].argmax(-1))
        tokens = torch.stack(steps, dim=1).tolist()
        for row, i in enumerate(batch):
            out[i] = tokens[row]
    return out


@torch.inference_mode()
def log_likelihoods(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    scored: Sequence[Sequence[bool]],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Sum of log p(token | tokens before it) over the positions flagged in ``scored`` (position 0 never is)."""
    if len(sequences) != len(scored) or any(len(s) != len(f) for s, f in zip(sequences, scored, strict=False)):
        raise ValueError("scored: needs one flag per token of every sequence")
    device = _device(model)
    out = [0.0] * len(sequences)
    for batch in _batches([len(s) for s in sequences], batch_size):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        flags = torch.zeros((len(batch), width), dtype=torch.bool, device=device)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
            mask[row, : len(sequences[i])] = 1
            flags[row, : len(sequences[i])] = torch.tensor(list(scored[i]), dtype=torch.bool)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        totals = (picked * flags[:, 1:]).to(torch.float64).sum(-1).tolist()
        for row, i in enumerate(batch):
            out[i] = totals[row]
    return out
