"""Greedy decoding and log-likelihood scoring, batched over token lists of different lengths.

Prompts are left-padded with explicit position ids, so a prompt decodes to the same tokens alone or
in any batch; batches are formed from length-sorted inputs to keep padding small. Tails scored
after a shared prefix reuse the prefix's KV cache, so the prefix runs once, not once per tail.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

__all__ = ["greedy_decode", "log_likelihoods", "shared_prefix_log_likelihoods"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pick(logits: torch.Tensor, counts: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Each row's argmax; with ``counts`` (tokens generated so far, per row) the penalised argmax, counted in.

    Without counts this is the plain argmax on the logits as they are, so penalty 0 decodes exactly
    as before the penalty existed.
    """
    if counts is None:
        return logits.argmax(-1)
    tokens = (logits.float() - penalty * counts).argmax(-1)
    counts[torch.arange(len(tokens), device=counts.device), tokens] += 1
    return tokens


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 64,
    frequency_penalty: float = 0.0,
) -> list[list[int]]:
    """Exactly ``max_new_tokens`` argmax tokens after each prompt, reusing the KV cache.

    End-of-sequence is not special: the audit compares fixed-length continuations, and a model that
    would stop early simply got those tokens wrong. A ``frequency_penalty`` lowers each token's logit
    by the penalty times its count in the continuation so far (the prompt does not count), as
    OpenAI's and vLLM's ``frequency_penalty`` do (Bossy et al.'s released code decodes with 1.0).
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
        logits = result.logits[:, -1]
        counts = torch.zeros(logits.shape, device=device) if frequency_penalty else None
        steps = [_pick(logits, counts, frequency_penalty)]
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
            steps.append(_pick(result.logits[:, -1], counts, frequency_penalty))
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


def _shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix common to all sequences that leaves each at least one token."""
    first, shortest = sequences[0], min(len(s) for s in sequences)
    for i in range(shortest - 1):
        if any(s[i] != first[i] for s in sequences):
            return i
    return max(shortest - 1, 0)


@torch.inference_mode()
def shared_prefix_log_likelihoods(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    scored: Sequence[Sequence[bool]],
    *,
    pad_id: int,
    batch_size: int = 64,
) -> list[float]:
    """``log_likelihoods``, computed once for the tokens all sequences start with.

    The longest common prefix runs through the model once; its KV cache is expanded over each batch
    of the differing tails, and only the tails run. Tails are right-padded: the model is causal, so
    padding after a tail's last token changes none of its log-probabilities and needs no mask.
    Without a common prefix this is ``log_likelihoods``.
    """
    if len(sequences) != len(scored) or any(len(s) != len(f) for s, f in zip(sequences, scored, strict=False)):
        raise ValueError("scored: needs one flag per token of every sequence")
    shared = _shared_prefix(sequences) if sequences else 0
    if shared == 0:
        return log_likelihoods(model, sequences, scored, pad_id=pad_id, batch_size=batch_size)
    device = _device(model)
    prefix = torch.tensor([list(sequences[0][:shared])], dtype=torch.long, device=device)
    start = model(input_ids=prefix, use_cache=True)
    logp = torch.log_softmax(start.logits[0].float(), dim=-1)
    within = logp[:-1].gather(-1, prefix[0, 1:, None]).squeeze(-1).to(torch.float64)  # tokens 1 .. shared-1
    first = logp[-1]  # predicts every tail's first token
    tails = [list(s[shared:]) for s in sequences]
    out = [0.0] * len(sequences)
    for batch in _batches([len(t) for t in tails], batch_size):
        width = max(len(tails[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        flags = torch.zeros((len(batch), shared + width), dtype=torch.bool, device=device)
        for row, i in enumerate(batch):
            ids[row, : len(tails[i])] = torch.tensor(tails[i], dtype=torch.long)
            flags[row, : len(scored[i])] = torch.tensor(list(scored[i]), dtype=torch.bool)
        picked = first[ids[:, :1]]
        if width > 1:
            cache = copy.deepcopy(start.cache)
            cache.batch_repeat_interleave(len(batch))
            positions = torch.arange(shared, shared + width - 1, device=device).expand(len(batch), -1)
            logits = model(input_ids=ids[:, :-1], position_ids=positions, cache=cache, use_cache=True).logits
            rest = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            picked = torch.cat([picked, rest], dim=1)
        in_tails = torch.where(flags[:, shared:], picked, 0.0).to(torch.float64).sum(-1)
        in_prefix = torch.where(flags[:, 1:shared], within, 0.0).sum(-1)
        totals = (in_prefix + in_tails).tolist()
        for row, i in enumerate(batch):
            out[i] = totals[row]
    return out
