"""Seconds for the canary audit of one lab site: exposure before and after, decoding by batch size.

The audit is fedlora_worker.audit on the 50 records of a clinical lab site (30 canaries + 20
controls) and the demo lab model, default AuditPlan and AuditOptions, one torch thread. Its two model-bound parts
are timed apart, each in this one process:

* Exposure, before: the previous scoring, kept here as a reference. Every occurrence of the secret
  is substituted, each whole record tokenized, and the sequences, cut after the last occurrence,
  scored without cache in batches of 16.
* Exposure, after: the audit itself (run_audit) with decoding stubbed out, so all it does beyond
  tokenizing is exposure: the secret scored at its first occurrence given the text before it, the
  candidates' shared prefix run once and its KV cache expanded over their tails. Its exposures are
  checked against the reference's.
* Decoding: greedy_decode of the audit's own prompts (captured from that run) at batch sizes 16,
  32 and 64.

The whole audit after is audit_model timed end to end; before is estimated from the parts.

Usage: python bench/audit.py [--quick] [--model-size tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from fedlora_common.plans import AuditPlan
from fedlora_lab.datagen import CanaryRecord, DataSpec, generate_site
from fedlora_lab.model_factory import LabModelConfig, cached_model
from fedlora_worker.audit import (
    AuditOptions,
    audit_model,
    candidate_space,
    exposure,
    greedy_decode,
    log_likelihoods,
    random_candidates,
    run_audit,
    shared_prefix_log_likelihoods,
)

BEFORE_BATCH = 16  # the previous default batch size
DECODE_BATCHES = (16, 32, 64)


class ScoringOnly:
    """A TokenModel that scores with the real model and decodes nothing, keeping the prompts it got."""

    def __init__(self, model: torch.nn.Module, pad_id: int, batch_size: int) -> None:
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.prompts: list[list[int]] = []

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        self.prompts += [list(p) for p in prompts]
        return [[self.pad_id] * max_new_tokens for _ in prompts]

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        return shared_prefix_log_likelihoods(
            self.model, sequences, scored, pad_id=self.pad_id, batch_size=self.batch_size
        )


def exposure_before(
    model: torch.nn.Module, tokenizer: Any, record: CanaryRecord, plan: AuditPlan, options: AuditOptions, pad_id: int
) -> float | None:
    """The previous exposure: whole substituted records, every occurrence scored, no cache."""
    secret = record["secrets"].get(options.exposure_secret)
    text = record["text"]
    if not secret or secret not in text:
        return None
    size = min(plan.exposure_candidates, candidate_space(secret))
    key = int.from_bytes(hashlib.sha256(record["id"].encode()).digest()[:8], "big")  # the audit's draw
    values = [secret, *random_candidates(secret, size - 1, np.random.default_rng([options.seed, key]))]
    spans, start = [], text.find(secret)
    while start >= 0:
        spans.append((start, start + len(secret)))
        start = text.find(secret, start + len(secret))
    batch = tokenizer([text.replace(secret, v) for v in values], return_offsets_mapping=True)
    sequences, flags = [], []
    for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True):
        scored = [i > 0 and any(a < e and b > s for s, e in spans) for i, (a, b) in enumerate(offsets)]
        end = max(i for i, flag in enumerate(scored) if flag) + 1
        sequences.append(ids[:end])
        flags.append(scored[:end])
    scores = log_likelihoods(model, sequences, flags, pad_id=pad_id, batch_size=BEFORE_BATCH)
    return exposure(scores[0], scores[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every 5th record: 6 canaries + 4 controls")
    parser.add_argument("--model-size", choices=["demo", "tiny"], default="demo", help="tiny builds in seconds")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedlora")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the box is shared)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore", category=UserWarning)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # the table only
    torch.set_num_threads(args.threads)

    lab = LabModelConfig() if args.model_size == "demo" else LabModelConfig.tiny()
    made = cached_model(args.cache_dir, lab)
    tokenizer = AutoTokenizer.from_pretrained(made.path)
    tokenizer.model_max_length = 1 << 30  # records are tokenized whole; no warning about the window
    model = AutoModelForCausalLM.from_pretrained(made.path)  # in eval mode
    pad = int(tokenizer.pad_token_id)
    site = generate_site("clinical", DataSpec())
    records = site.canaries + site.controls
    records = records[::5] if args.quick else records
    plan, options = AuditPlan(), AuditOptions()

    started = time.perf_counter()
    before = [exposure_before(model, tokenizer, r, plan, options, pad) for r in records]
    t_before = time.perf_counter() - started

    scoring = ScoringOnly(model, pad, options.batch_size)
    started = time.perf_counter()
    after = run_audit(scoring, tokenizer, records, plan=plan, options=options).exposures
    t_after = time.perf_counter() - started
    same = sum(b is not None and abs(b - e.exposure) < 1e-9 for b, e in zip(before, after, strict=False))

    decoding: dict[int, float] = {}
    for batch in DECODE_BATCHES:
        started = time.perf_counter()
        greedy_decode(model, scoring.prompts, max_new_tokens=plan.suffix_tokens, pad_id=pad, batch_size=batch)
        decoding[batch] = time.perf_counter() - started

    total = audit_model(model, tokenizer, records, plan=plan, options=options).seconds
    rest = max(total - t_after - decoding[options.batch_size], 0.0)
    estimate = t_before + decoding[BEFORE_BATCH] + rest

    rows = [
        (f"exposure before (whole records, batch {BEFORE_BATCH}, no cache)", t_before, t_before),
        ("exposure after (first occurrence, shared-prefix KV cache)", t_after, t_before),
        *[(f"decoding, batch {b}", decoding[b], decoding[BEFORE_BATCH]) for b in DECODE_BATCHES],
        (f"audit before (est.: exposure before + decoding {BEFORE_BATCH} + rest)", estimate, estimate),
        (f"audit after (audit_model, batch {options.batch_size})", total, estimate),
    ]
    header = f"{'part':<62} {'seconds':>8} {'vs before':>10}"
    print(header)
    print("-" * len(header))
    for name, seconds, reference in rows:
        print(f"{name:<62} {seconds:>8.1f} {seconds / reference:>10.3f}")
    print()
    groups = [r["group"] for r in records]
    lengths = [len(p) for p in scoring.prompts]
    print(
        f"model: lab {args.model_size} ({lab.num_layers} layers, hidden {lab.hidden_size}, vocab {lab.vocab_size}); "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"records: {len(records)} ({groups.count('10x')} 10x, {groups.count('1x')} 1x, {groups.count('control')} "
        f"control); {len(lengths)} distinct prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{plan.suffix_tokens} new tokens each"
    )
    once = sum(r["text"].count(r["secrets"][options.exposure_secret]) == 1 for r in records)
    print(
        f"exposure: {plan.exposure_candidates} candidates per record; after = before on {same}/{len(records)} "
        f"records; the secret occurs once in {once}/{len(records)}"
    )
    print(f"rest (tokenizing, continuation metrics) in the audit after: {rest:.1f} s")


if __name__ == "__main__":
    main()
