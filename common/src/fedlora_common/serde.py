"""The one place that converts protocol messages to and from their protobuf form."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.messages import (
    AuditPlan,
    GoldfishPlan,
    LoraSpec,
    Memorization,
    MemorizationRates,
    MetricsReport,
    ModelVersion,
    RecordDPPlan,
    RunSpec,
    SecAggTask,
    Task,
    TaskKind,
    TrainingPlan,
    UploadHeader,
    UploadKind,
)
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg.protocol import Advertisement, EncryptedShare, RevealedShare, SecAggParams

__all__ = [
    "advertisement_from_proto",
    "advertisement_to_proto",
    "encrypted_share_from_proto",
    "encrypted_share_to_proto",
    "manifest_from_proto",
    "manifest_to_proto",
    "metrics_from_proto",
    "metrics_to_proto",
    "model_version_from_proto",
    "model_version_to_proto",
    "revealed_share_from_proto",
    "revealed_share_to_proto",
    "run_spec_from_proto",
    "run_spec_to_proto",
    "task_from_proto",
    "task_to_proto",
    "upload_header_from_proto",
    "upload_header_to_proto",
]


E = TypeVar("E", bound=enum.Enum)
M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], **fields: Any) -> M:
    """A settings model from wire fields, validated as if it came from a config file; ValueError names the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise ValueError(f"{model.__name__}.{where}: {first['msg']}") from None


def _enum_from_proto(cls: type[E], value: int, name_of: Callable[[Any], str], prefix: str) -> E:
    """The Python enum member of a wire enum value; ValueError for unknown or UNSPECIFIED values."""
    try:
        return cls[name_of(value).removeprefix(prefix)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown {cls.__name__} value {value}") from None


def manifest_to_proto(manifest: Manifest) -> pb.Manifest:
    return pb.Manifest(
        tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in manifest.tensors]
    )


def manifest_from_proto(msg: pb.Manifest) -> Manifest:
    return Manifest(tuple(TensorSpec(t.name, tuple(int(d) for d in t.shape), t.dtype) for t in msg.tensors))


def _lora_to_proto(lora: LoraSpec) -> pb.LoraSpec:
    return pb.LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules))


def run_spec_to_proto(spec: RunSpec) -> pb.RunSpec:
    return pb.RunSpec(
        run_id=spec.run_id,
        mode=spec.mode,
        aggregation=spec.aggregation,
        base_model=spec.base_model,
        lora=_lora_to_proto(spec.lora),
        total_rounds=spec.total_rounds,
        seed=spec.seed,
        base_precisions=list(spec.base_precisions),
    )


def run_spec_from_proto(msg: pb.RunSpec) -> RunSpec:
    """The run's fixed settings; ValueError (naming the field) for values no coordinator sends."""
    return _validated(
        RunSpec,
        run_id=msg.run_id,
        mode=msg.mode,
        aggregation=msg.aggregation,
        base_model=msg.base_model,
        lora=_validated(
            LoraSpec,
            rank=msg.lora.rank,
            alpha=msg.lora.alpha,
            dropout=msg.lora.dropout,
            target_modules=tuple(msg.lora.target_modules),
        ),
        total_rounds=msg.total_rounds,
        seed=msg.seed,
        base_precisions=tuple(msg.base_precisions),
    )


def model_version_to_proto(version: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        version=version.version,
        size_bytes=version.size_bytes,
        sha256=version.sha256,
        manifest=manifest_to_proto(version.manifest),
    )


def model_version_from_proto(msg: pb.ModelVersion) -> ModelVersion:
    return ModelVersion(msg.version, msg.size_bytes, bytes(msg.sha256), manifest_from_proto(msg.manifest))


def _plan_to_proto(plan: TrainingPlan) -> pb.TrainingPlan:
    msg = pb.TrainingPlan(
        local_steps=plan.local_steps,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        max_seq_len=plan.max_seq_len,
        grad_clip_norm=plan.grad_clip_norm,
        update_clip_norm=plan.update_clip_norm,
        seed=plan.seed,
        micro_batch_size=plan.micro_batch_size or 0,
        gradient_checkpointing=plan.gradient_checkpointing,
        packing=plan.packing,
        lr_schedule=plan.lr_schedule,
        warmup_steps=plan.warmup_steps,
        min_lr_ratio=plan.min_lr_ratio,
        precision=plan.precision,
        schedule_start=plan.schedule_start,
        schedule_steps=plan.schedule_steps,
        proximal_mu=plan.proximal_mu,
    )
    if plan.goldfish is not None:
        g = plan.goldfish
        msg.goldfish.CopyFrom(pb.GoldfishPlan(k=g.k, h=g.h, seed=g.seed))
    if plan.record_dp is not None:
        d = plan.record_dp
        msg.record_dp.CopyFrom(
            pb.RecordDpPlan(noise_multiplier=d.noise_multiplier, max_grad_norm=d.max_grad_norm, delta=d.delta)
        )
    return msg


def _plan_from_proto(msg: pb.TrainingPlan) -> TrainingPlan:
    g, d = msg.goldfish, msg.record_dp
    return _validated(
        TrainingPlan,
        local_steps=msg.local_steps,
        batch_size=msg.batch_size,
        learning_rate=msg.learning_rate,
        max_seq_len=msg.max_seq_len,
        grad_clip_norm=msg.grad_clip_norm,
        update_clip_norm=msg.update_clip_norm,
        seed=msg.seed,
        micro_batch_size=msg.micro_batch_size or None,
        gradient_checkpointing=msg.gradient_checkpointing,
        packing=msg.packing,
        lr_schedule=msg.lr_schedule,
        warmup_steps=msg.warmup_steps,
        min_lr_ratio=msg.min_lr_ratio,
        precision=msg.precision,
        schedule_start=msg.schedule_start,
        schedule_steps=msg.schedule_steps,
        proximal_mu=msg.proximal_mu,
        goldfish=_validated(GoldfishPlan, k=g.k, h=g.h, seed=g.seed) if msg.HasField("goldfish") else None,
        record_dp=(
            _validated(RecordDPPlan, noise_multiplier=d.noise_multiplier, max_grad_norm=d.max_grad_norm, delta=d.delta)
            if msg.HasField("record_dp")
            else None
        ),
    )


def _rates_to_proto(rates: MemorizationRates) -> pb.MemorizationRates:
    return pb.MemorizationRates(
        count=rates.count,
        exact_match_rate=rates.exact_match_rate,
        approx_match_rate=rates.approx_match_rate,
        token_accuracy=rates.token_accuracy,
        pii_extraction_rate=rates.pii_extraction_rate,
        mean_exposure=rates.mean_exposure,
    )


def _rates_from_proto(msg: pb.MemorizationRates) -> MemorizationRates:
    return MemorizationRates(
        msg.count,
        msg.exact_match_rate,
        msg.approx_match_rate,
        msg.token_accuracy,
        msg.pii_extraction_rate,
        msg.mean_exposure,
    )


def _memorization_to_proto(memo: Memorization) -> pb.Memorization:
    msg = pb.Memorization(overall=_rates_to_proto(memo.overall))
    for group, rates in memo.by_duplication.items():
        msg.by_duplication[group].CopyFrom(_rates_to_proto(rates))
    return msg


def _memorization_from_proto(msg: pb.Memorization) -> Memorization:
    return Memorization(
        _rates_from_proto(msg.overall),
        {group: _rates_from_proto(rates) for group, rates in sorted(msg.by_duplication.items())},
    )


def advertisement_to_proto(ad: Advertisement) -> pb.Advertisement:
    return pb.Advertisement(
        worker_id=ad.worker_id,
        mask_public=ad.mask_public,
        enc_public=ad.enc_public,
        signature=ad.signature,
        seed_commitment=ad.seed_commitment,
    )


def advertisement_from_proto(msg: pb.Advertisement) -> Advertisement:
    return Advertisement(
        msg.worker_id, bytes(msg.mask_public), bytes(msg.enc_public), bytes(msg.signature), bytes(msg.seed_commitment)
    )


def encrypted_share_to_proto(share: EncryptedShare) -> pb.EncryptedShare:
    return pb.EncryptedShare(sender=share.sender, recipient=share.recipient, ciphertext=share.ciphertext)


def encrypted_share_from_proto(msg: pb.EncryptedShare) -> EncryptedShare:
    return EncryptedShare(msg.sender, msg.recipient, bytes(msg.ciphertext))


def revealed_share_to_proto(share: RevealedShare) -> pb.RevealedShare:
    return pb.RevealedShare(owner=share.owner, kind=share.kind, share=share.share)


def revealed_share_from_proto(msg: pb.RevealedShare) -> RevealedShare:
    if msg.kind not in ("self_seed", "mask_key"):
        raise ValueError(f"unknown share kind {msg.kind!r}")
    return RevealedShare(msg.owner, msg.kind, bytes(msg.share))  # type: ignore[arg-type]


def _secagg_to_proto(task: SecAggTask) -> pb.SecAggPlan:
    p = task.params
    return pb.SecAggPlan(
        tag=p.tag,
        participants=list(p.participants),
        threshold=p.threshold,
        bits=p.bits,
        clip_range=p.clip_range,
        max_examples=p.max_examples,
        noise_variance=p.noise_variance,
        roster=[advertisement_to_proto(a) for a in task.roster],
        inbox=[encrypted_share_to_proto(s) for s in task.inbox],
        survivors=list(task.survivors),
        dropped=list(task.dropped),
    )


def _secagg_from_proto(msg: pb.SecAggPlan, run_id: str) -> SecAggTask:
    params = SecAggParams(
        run_id=run_id,
        tag=msg.tag,
        participants=tuple(msg.participants),
        threshold=msg.threshold,
        bits=msg.bits,
        clip_range=msg.clip_range,
        max_examples=msg.max_examples,
        noise_variance=msg.noise_variance,
    )
    return SecAggTask(
        params=params,
        roster=tuple(advertisement_from_proto(a) for a in msg.roster),
        inbox=tuple(encrypted_share_from_proto(s) for s in msg.inbox),
        survivors=tuple(msg.survivors),
        dropped=tuple(msg.dropped),
    )


def task_to_proto(task: Task) -> pb.Task:
    msg = pb.Task(
        kind=pb.TaskKind.Value(f"TASK_KIND_{task.kind.name}"),
        round=task.round,
        participants=list(task.participants),
        retry_after_ms=task.retry_after_ms,
        deadline_s=task.deadline_s,
        reason=task.reason,
    )
    if task.global_version is not None:
        msg.model.CopyFrom(model_version_to_proto(task.global_version))
    if task.training is not None:
        msg.training.CopyFrom(_plan_to_proto(task.training))
    if task.secagg is not None:
        msg.secagg.CopyFrom(_secagg_to_proto(task.secagg))
    if task.audit is not None:
        a = task.audit
        msg.audit.CopyFrom(
            pb.AuditPlan(
                prefixes=list(a.prefixes),
                suffix_tokens=a.suffix_tokens,
                exposure_candidates=a.exposure_candidates,
                frequency_penalty=a.frequency_penalty,
            )
        )
    return msg


def task_from_proto(msg: pb.Task, *, run_id: str = "") -> Task:
    """The task; `run_id` completes the secure-aggregation parameters (the wire does not repeat it)."""
    return Task(
        kind=_enum_from_proto(TaskKind, msg.kind, pb.TaskKind.Name, "TASK_KIND_"),
        round=msg.round,
        global_version=model_version_from_proto(msg.model) if msg.HasField("model") else None,
        training=_plan_from_proto(msg.training) if msg.HasField("training") else None,
        participants=tuple(msg.participants),
        retry_after_ms=msg.retry_after_ms,
        deadline_s=msg.deadline_s,
        secagg=_secagg_from_proto(msg.secagg, run_id) if msg.HasField("secagg") else None,
        audit=(
            _validated(
                AuditPlan,
                prefixes=tuple(msg.audit.prefixes),
                suffix_tokens=msg.audit.suffix_tokens,
                exposure_candidates=msg.audit.exposure_candidates,
                frequency_penalty=msg.audit.frequency_penalty,
            )
            if msg.HasField("audit")
            else None
        ),
        reason=msg.reason,
    )


def upload_header_to_proto(header: UploadHeader) -> pb.UploadHeader:
    msg = pb.UploadHeader(
        worker_id=header.worker_id,
        run_id=header.run_id,
        round=header.round,
        kind=pb.UploadKind.Value(f"UPLOAD_KIND_{header.kind.name}"),
        base_version=header.base_version,
        num_examples=header.num_examples,
        total_size=header.total_size,
        chunk_count=header.chunk_count,
        sha256=header.sha256,
        dtype=header.dtype,
        artifact_config_json=header.artifact_config_json,
        train_loss=header.train_loss,
        tag=header.tag,
    )
    if header.manifest is not None:
        msg.manifest.CopyFrom(manifest_to_proto(header.manifest))
    return msg


def upload_header_from_proto(msg: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(
        worker_id=msg.worker_id,
        run_id=msg.run_id,
        round=msg.round,
        kind=_enum_from_proto(UploadKind, msg.kind, pb.UploadKind.Name, "UPLOAD_KIND_"),
        base_version=msg.base_version,
        num_examples=msg.num_examples,
        total_size=msg.total_size,
        chunk_count=msg.chunk_count,
        sha256=bytes(msg.sha256),
        dtype=msg.dtype,
        manifest=manifest_from_proto(msg.manifest) if msg.HasField("manifest") else None,
        artifact_config_json=msg.artifact_config_json,
        train_loss=msg.train_loss,
        tag=msg.tag,
    )


def metrics_to_proto(report: MetricsReport) -> pb.MetricsReport:
    msg = pb.MetricsReport(
        worker_id=report.worker_id,
        run_id=report.run_id,
        round=report.round,
        version=report.version,
        eval_loss=report.eval_loss,
        eval_tokens=report.eval_tokens,
        train_loss=report.train_loss,
        tokens_per_second=report.tokens_per_second,
        record_epsilon=report.record_epsilon,
    )
    if report.memorization is not None:
        msg.memorization.CopyFrom(_memorization_to_proto(report.memorization))
    return msg


def metrics_from_proto(msg: pb.MetricsReport) -> MetricsReport:
    return MetricsReport(
        worker_id=msg.worker_id,
        run_id=msg.run_id,
        round=msg.round,
        version=msg.version,
        eval_loss=msg.eval_loss,
        eval_tokens=msg.eval_tokens,
        train_loss=msg.train_loss,
        tokens_per_second=msg.tokens_per_second,
        record_epsilon=msg.record_epsilon if msg.HasField("record_epsilon") else None,
        memorization=_memorization_from_proto(msg.memorization) if msg.HasField("memorization") else None,
    )
