"""Memorization audit: how much of its canary records a fine-tuned model gives back, beside controls."""

from fedlora_worker.audit._candidates import candidate_space, random_candidates
from fedlora_worker.audit._extrapolation import MIN_FIT_CANDIDATES, extrapolated_exposure
from fedlora_worker.audit._generation import greedy_decode, log_likelihoods, shared_prefix_log_likelihoods
from fedlora_worker.audit._metrics import (
    approx_match,
    exact_match,
    exposure,
    longest_matching_prefix,
    secret_rank,
    sentence_bleu,
    token_accuracy,
)
from fedlora_worker.audit._runner import (
    AuditOptions,
    AuditReport,
    ContinuationResult,
    ExposureResult,
    PiiResult,
    ProgressFn,
    TokenModel,
    audit_model,
    load_canaries,
    run_audit,
)

__all__ = [
    "MIN_FIT_CANDIDATES",
    "AuditOptions",
    "AuditReport",
    "ContinuationResult",
    "ExposureResult",
    "PiiResult",
    "ProgressFn",
    "TokenModel",
    "approx_match",
    "audit_model",
    "candidate_space",
    "exact_match",
    "exposure",
    "extrapolated_exposure",
    "greedy_decode",
    "load_canaries",
    "log_likelihoods",
    "longest_matching_prefix",
    "random_candidates",
    "run_audit",
    "secret_rank",
    "sentence_bleu",
    "shared_prefix_log_likelihoods",
    "token_accuracy",
]
