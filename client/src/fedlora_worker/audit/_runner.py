"""The canary extraction audit: prompt each record with prefixes, decode greedily, score, aggregate.

Three measurements per record, each also made on the control group (same format, never trained on):

The run decides what is measured (``AuditPlan``: prefixes, suffix_tokens, exposure_candidates and
the decoding's frequency_penalty); the site decides how (``AuditOptions``: BLEU threshold, batch
size, seed, the secret exposure ranks).

* Continuation. The record's last ``suffix_tokens`` tokens are the target; for each prefix length
  ``p`` with at least ``p + suffix_tokens`` tokens in the record, the prompt is the ``p`` tokens
  right before the target (tokens as training saw them, beginning-of-sequence included). Scored by
  exact match, approximate match (sentence BLEU of the decoded texts), token accuracy and the
  longest correct run from the start.
* PII extraction. Secrets sit in a record's header, never in its last tokens, so they are probed
  where they occur: for each secret field the prompt is up to ``p`` tokens right before the
  secret's first occurrence (the whole header when it is shorter than ``p``), and the secret counts
  as extracted if its value appears in the decoded continuation. The prompt never contains it.
* Exposure (Carlini et al. 2019) of the ``exposure_secret`` field: the true value is ranked among
  ``exposure_candidates - 1`` random values of its format by the log-likelihood of the tokens that
  spell the value at its first occurrence given only the record text before it (their log-perplexity,
  negated), with the candidate substituted. Later occurrences, and all text after the first, play no
  part. It does not depend on the prefix. Beside it, the extrapolated exposure: the secret's tail
  under a skew-normal fitted to the candidates' scores, which goes on past log2 |R| where the rank
  stops (`extrapolated_exposure`).

Prefixes combine per record as an attacker would use them: a record counts as exactly (or
approximately) extracted if some prefix extracts it, its token accuracy and longest run are the best
over prefixes, and a secret counts as extracted if some prefix extracts it. ``by_prefix`` reports
each prefix alone. No record text, token or decoded text ever reaches a log or the summary.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import structlog
import torch
from pydantic import Field

from fedlora_common.plans import AuditPlan
from fedlora_common.settings import StrictModel
from fedlora_worker.audit._candidates import candidate_space, random_candidates
from fedlora_worker.audit._extrapolation import extrapolated_exposure
from fedlora_worker.audit._generation import greedy_decode, shared_prefix_log_likelihoods
from fedlora_worker.audit._metrics import (
    exact_match,
    exposure,
    longest_matching_prefix,
    sentence_bleu,
    token_accuracy,
)
from fedlora_worker.datafiles import read_canaries
from fedlora_worker.records import CanaryRecord, Group

__all__ = [
    "AuditOptions",
    "AuditReport",
    "ContinuationResult",
    "ExposureResult",
    "PiiResult",
    "ProgressFn",
    "TokenModel",
    "audit_model",
    "load_canaries",
    "run_audit",
]

ProgressFn = Callable[[int, int], None]
"""Called with (prompts decoded, prompts in total) as decoding advances."""

_GROUPS: Final[tuple[Group, ...]] = ("control", "1x", "10x")
_TRAINED: Final[frozenset[Group]] = frozenset({"1x", "10x"})
_DECODE_CHUNK_BATCHES: Final = 4
# Exposure tokenizes a substituted record only this far past the secret's first occurrence: enough
# for the tokens that spell it to come out as in the whole record (checked on the true value).
_CONTEXT_CHARS: Final = 64


class AuditOptions(StrictModel):
    """How this site runs the audit; what it measures is the run's AuditPlan."""

    bleu_threshold: float = Field(0.75, gt=0, le=1, description="Sentence BLEU at which a continuation counts")
    batch_size: int = Field(
        64, ge=1, description="Prompts per batch; 64 was fastest on one CPU thread (bench/audit.py)"
    )
    seed: int = Field(0, ge=0, description="Key of the exposure candidates drawn for each record")
    exposure_secret: str = Field("record_id", min_length=1, description="The secret field exposure ranks")


class TokenModel(Protocol):
    """The two things the audit asks of a language model, over token ids."""

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        """``max_new_tokens`` greedy tokens after each prompt, each token's logit lowered by
        ``frequency_penalty`` times its count in the continuation so far (0: plain argmax)."""
        ...

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        """Summed log-probability of the flagged tokens of each sequence (each a record's tokens
        through its secret's first occurrence, all candidates of one record in one call)."""
        ...


@dataclass(frozen=True)
class ContinuationResult:
    """One record prompted with one prefix length; ``record`` indexes the audited records."""

    record: int
    group: Group
    prefix: int
    exact: bool
    approx: bool
    bleu: float
    token_accuracy: float
    longest_prefix: int


@dataclass(frozen=True)
class PiiResult:
    """Whether one secret field of one record came out with one prefix length."""

    record: int
    group: Group
    prefix: int
    field: str
    extracted: bool


@dataclass(frozen=True)
class ExposureResult:
    """Exposure of one record's secret among ``candidates`` values of its format: by its rank, and
    extrapolated from the candidates' score distribution."""

    record: int
    group: Group
    exposure: float
    exposure_extrapolated: float
    candidates: int


def _rate(flags: Iterable[bool]) -> float | None:
    values = list(flags)
    return sum(values) / len(values) if values else None


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def _max(values: Iterable[float]) -> float | None:
    items = list(values)
    return max(items) if items else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class AuditReport:
    """Per-(record, prefix) results of one audit; ``summary`` is the only part meant to leave a site."""

    plan: AuditPlan
    options: AuditOptions
    groups: tuple[Group, ...]
    continuations: tuple[ContinuationResult, ...]
    pii: tuple[PiiResult, ...]
    exposures: tuple[ExposureResult, ...]
    seconds: float

    def _stats(self, groups: frozenset[Group], prefix: int | None) -> dict[str, Any]:
        """Aggregates over ``groups``: at one prefix, or per record the best over prefixes (None)."""
        conts = [c for c in self.continuations if c.group in groups and prefix in (None, c.prefix)]
        per_record: dict[int, list[ContinuationResult]] = {}
        for c in conts:
            per_record.setdefault(c.record, []).append(c)
        exact = [any(c.exact for c in rs) for rs in per_record.values()]
        approx = [any(c.approx for c in rs) for rs in per_record.values()]
        accuracy = [max(c.token_accuracy for c in rs) for rs in per_record.values()]
        longest = [float(max(c.longest_prefix for c in rs)) for rs in per_record.values()]
        secrets: dict[tuple[int, str], bool] = {}
        for s in self.pii:
            if s.group in groups and prefix in (None, s.prefix):
                secrets[(s.record, s.field)] = secrets.get((s.record, s.field), False) or s.extracted
        exposures = [e for e in self.exposures if e.group in groups]
        ranked = [e.exposure for e in exposures]
        extrapolated = [e.exposure_extrapolated for e in exposures]
        stats = {
            "exact_match_rate": _rate(exact),
            "approx_match_rate": _rate(approx),
            "token_accuracy": _mean(accuracy),
            "max_token_accuracy": _max(accuracy),
            "mean_longest_prefix": _mean(longest),
            "longest_prefix_max": _max(longest),
            "pii_extraction_rate": _rate(secrets.values()),
            "mean_exposure": _mean(ranked),
            "worst_exposure": _max(ranked),
            "mean_exposure_extrapolated": _mean(extrapolated),
            "worst_exposure_extrapolated": _max(extrapolated),
        }
        return {
            **{key: _rounded(value) for key, value in stats.items()},
            "count": len(per_record),
            "pii_secrets": len(secrets),
            "exposure_count": len(exposures),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready aggregates only: overall (trained canaries, 1x and 10x), by duplication, by prefix.

        Rates are None where nothing was measured (e.g. no record long enough for a prefix). ``count``
        is the number of records with a continuation measured, ``pii_secrets`` the (record, secret)
        pairs probed, ``exposure_count`` the records whose exposure was measured; exposure repeats
        unchanged under every prefix.
        """
        overall = self._stats(_TRAINED, None)
        keys = (
            "exact_match_rate",
            "approx_match_rate",
            "mean_exposure",
            "mean_exposure_extrapolated",
            "token_accuracy",
            "pii_extraction_rate",
        )
        return {
            **{key: overall[key] for key in keys},
            "by_duplication": {g: self._stats(frozenset({g}), None) for g in _GROUPS},
            "by_prefix": {str(p): {g: self._stats(frozenset({g}), p) for g in _GROUPS} for p in self.plan.prefixes},
            "config": {
                "prefixes": list(self.plan.prefixes),
                "suffix_tokens": self.plan.suffix_tokens,
                "bleu_threshold": self.options.bleu_threshold,
                "exposure_candidates": self.plan.exposure_candidates,
                "frequency_penalty": self.plan.frequency_penalty,
                "exposure_secret": self.options.exposure_secret,
            },
            "records": {g: sum(x == g for x in self.groups) for g in _GROUPS},
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[_Encoded]:
    """Token ids as training saw them (special tokens included) with character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: the audit needs a fast tokenizer (it maps secrets to tokens by offsets)")
    batch = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    return [
        _Encoded(list(ids), [(int(a), int(b)) for a, b in offsets])
        for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
    ]


def _occurrences(text: str, value: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(value)
    while value and start >= 0:
        spans.append((start, start + len(value)))
        start = text.find(value, start + len(value))
    return spans


def _overlaps(offset: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    return any(offset[0] < end and offset[1] > start for start, end in spans)


def _record_rng(seed: int, record_id: str) -> np.random.Generator:
    """Candidates depend on the seed and the record, not on the record's position in the file."""
    key = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, key])


def _first_occurrence(
    tokenizer: Any, texts: Sequence[str], span: tuple[int, int]
) -> tuple[list[list[int]], list[list[bool]]] | None:
    """Each text's tokens through those overlapping ``span``, flagged; None if no token overlaps it."""
    sequences: list[list[int]] = []
    flags: list[list[bool]] = []
    for enc in _encode(tokenizer, texts):
        scored = []
        for i, offset in enumerate(enc.offsets):
            if offset[0] >= span[1] and offset[1] > offset[0]:
                break
            scored.append(i > 0 and _overlaps(offset, [span]))
        if not any(scored):
            return None
        end = max(i for i, flag in enumerate(scored) if flag) + 1
        sequences.append(enc.ids[:end])
        flags.append(scored[:end])
    return sequences, flags


def _exposure(
    lm: TokenModel, tokenizer: Any, record: CanaryRecord, whole: _Encoded, plan: AuditPlan, options: AuditOptions
) -> tuple[float, float, int] | None:
    """(exposure, extrapolated exposure, |R|) of the record's exposure secret, or None if it has none
    or it never occurs.

    Each candidate's score is log p(secret tokens | tokens before them) at the first occurrence,
    the tokens as training saw them in the whole record; ``whole`` is the record's own encoding.
    """
    secret = record["secrets"].get(options.exposure_secret)
    start = record["text"].find(secret) if secret else -1
    if not secret or start < 0:
        return None
    space = candidate_space(secret)
    size = min(plan.exposure_candidates, space)
    if size < 2:
        return None
    values = [secret, *random_candidates(secret, size - 1, _record_rng(options.seed, record["id"]))]
    # Candidates keep the secret's length, so its character span holds in every substituted text.
    span = (start, start + len(secret))
    head = record["text"][: span[1] + _CONTEXT_CHARS]
    found = _first_occurrence(tokenizer, [head.replace(secret, value) for value in values], span)
    if found is None:
        return None
    sequences, flags = found
    if sequences[0] != whole.ids[: len(sequences[0])]:  # the cut changed the tokens: use whole texts
        found = _first_occurrence(tokenizer, [record["text"].replace(secret, value) for value in values], span)
        if found is None:
            return None
        sequences, flags = found
    scores = lm.log_likelihood(sequences, flags)
    return exposure(scores[0], scores[1:]), extrapolated_exposure(scores[0], scores[1:], space=space), size


def run_audit(
    lm: TokenModel,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    *,
    plan: AuditPlan,
    options: AuditOptions | None = None,
    progress: ProgressFn | None = None,
) -> AuditReport:
    """The audit over any ``TokenModel``; ``audit_model`` wraps a torch causal LM. No options: the defaults."""
    options = options or AuditOptions()
    log = structlog.get_logger(__name__)
    started = time.perf_counter()
    groups = tuple(r["group"] for r in records)
    log.info("audit_started", records=len(records), **{g: groups.count(g) for g in _GROUPS})
    encoded = _encode(tokenizer, [r["text"] for r in records])
    suffix = plan.suffix_tokens

    prompts: dict[tuple[int, ...], int] = {}
    cont_jobs: list[tuple[int, int, int]] = []  # (record, prefix, prompt)
    pii_jobs: list[tuple[int, int, str, int]] = []  # (record, prefix, field, prompt)
    for index, (record, enc) in enumerate(zip(records, encoded, strict=True)):
        cut = len(enc.ids) - suffix
        for p in plan.prefixes:
            if cut >= p:
                key = tuple(enc.ids[cut - p : cut])
                cont_jobs.append((index, p, prompts.setdefault(key, len(prompts))))
        for field, value in record["secrets"].items():
            spans = _occurrences(record["text"], value)
            if not spans:
                continue
            first = next((i for i, offset in enumerate(enc.offsets) if offset[1] > spans[0][0]), len(enc.ids))
            if first == 0:
                continue  # nothing precedes the secret to prompt with
            for p in plan.prefixes:
                key = tuple(enc.ids[max(0, first - p) : first])
                pii_jobs.append((index, p, field, prompts.setdefault(key, len(prompts))))

    unique = list(prompts)
    # Decode in length order, in chunks, so that progress can be reported and padding stays small.
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    chunk = options.batch_size * _DECODE_CHUNK_BATCHES
    decoded: list[list[int]] = [[] for _ in unique]
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        generated = lm.greedy([unique[i] for i in part], suffix, frequency_penalty=plan.frequency_penalty)
        for i, tokens in zip(part, generated, strict=True):
            decoded[i] = tokens
        if progress is not None:
            progress(min(start + chunk, len(order)), len(order))
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in decoded]

    continuations = []
    for index, p, prompt in cont_jobs:
        target = encoded[index].ids[-suffix:]
        bleu = sentence_bleu(texts[prompt], tokenizer.decode(target, skip_special_tokens=True))
        continuations.append(
            ContinuationResult(
                record=index,
                group=groups[index],
                prefix=p,
                exact=exact_match(decoded[prompt], target),
                approx=bleu >= options.bleu_threshold,
                bleu=bleu,
                token_accuracy=token_accuracy(decoded[prompt], target),
                longest_prefix=longest_matching_prefix(decoded[prompt], target),
            )
        )
    pii = [
        PiiResult(index, groups[index], p, field, records[index]["secrets"][field] in texts[prompt])
        for index, p, field, prompt in pii_jobs
    ]
    exposures = []
    for index, record in enumerate(records):
        measured = _exposure(lm, tokenizer, record, encoded[index], plan, options)
        if measured is not None:
            exposures.append(ExposureResult(index, groups[index], *measured))

    report = AuditReport(
        plan=plan,
        options=options,
        groups=groups,
        continuations=tuple(continuations),
        pii=tuple(pii),
        exposures=tuple(exposures),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "audit_finished",
        seconds=round(report.seconds, 3),
        prompts=len(unique),
        continuations=len(continuations),
        secrets_probed=len(pii),
        exposures=len(exposures),
    )
    return report


@dataclass(frozen=True)
class _TorchTokenModel:
    model: torch.nn.Module
    pad_id: int
    batch_size: int

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        return greedy_decode(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            pad_id=self.pad_id,
            batch_size=self.batch_size,
            frequency_penalty=frequency_penalty,
        )

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        # The audit scores one record's candidates per call: they share the text before the secret.
        return shared_prefix_log_likelihoods(
            self.model, sequences, scored, pad_id=self.pad_id, batch_size=self.batch_size
        )


def audit_model(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    *,
    plan: AuditPlan,
    options: AuditOptions | None = None,
    progress: ProgressFn | None = None,
) -> AuditReport:
    """Audit a causal LM (a base model with a peft adapter, or a full model) in eval mode."""
    options = options or AuditOptions()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad nor an eos token to pad batches with")
    was_training = model.training
    model.eval()  # no LoRA dropout: greedy decoding must be deterministic
    try:
        return run_audit(
            _TorchTokenModel(model, int(pad), options.batch_size),
            tokenizer,
            records,
            plan=plan,
            options=options,
            progress=progress,
        )
    finally:
        model.train(was_training)


def load_canaries(paths: Iterable[str | Path]) -> list[CanaryRecord]:
    """Canary and control records from jsonl files (``canaries.jsonl``, ``controls.jsonl``), in order.

    Read and checked by `fedlora_worker.datafiles.read_canaries`: a fault is a DataError naming the
    file, the row and the field, never a value.
    """
    return read_canaries([Path(p) for p in paths])
