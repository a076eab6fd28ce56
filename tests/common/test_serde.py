import random

import pytest

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
    Task,
    TaskKind,
    TrainingPlan,
    UploadHeader,
    UploadKind,
)
from fedlora_common.serde import (
    metrics_from_proto,
    metrics_to_proto,
    run_spec_from_proto,
    run_spec_to_proto,
    task_from_proto,
    task_to_proto,
    upload_header_from_proto,
    upload_header_to_proto,
)


def _manifest(rng: random.Random) -> Manifest:
    return Manifest(
        tuple(
            TensorSpec(f"layer.{i}.lora_{'AB'[i % 2]}.weight", (rng.randint(1, 64), rng.randint(1, 64)))
            for i in range(rng.randint(1, 6))
        )
    )


def _floats(rng: random.Random) -> float:
    return float(rng.choice([0.5, 0.25, 3.0, 1e-3 * 1024]))


def test_task_round_trips() -> None:
    rng = random.Random(7)
    for kind in TaskKind:
        task = Task(
            kind=kind,
            round=rng.randint(0, 100),
            global_version=ModelVersion(rng.randint(0, 9), rng.randint(1, 10**9), rng.randbytes(32), _manifest(rng)),
            training=TrainingPlan(
                local_steps=rng.randint(1, 50),
                batch_size=8,
                learning_rate=_floats(rng),
                max_seq_len=256,
                grad_clip_norm=1.0,
                update_clip_norm=0.5,
                seed=rng.randint(0, 2**40),
            ),
            participants=("clinical", "legal"),
            retry_after_ms=500,
            deadline_s=12.5,
        )

        assert task_from_proto(task_to_proto(task)) == task


def test_privacy_plans_and_audit_round_trip() -> None:
    rng = random.Random(13)
    for _ in range(5):
        plan = TrainingPlan(
            local_steps=rng.randint(1, 50),
            batch_size=8,
            learning_rate=_floats(rng),
            max_seq_len=256,
            grad_clip_norm=1.0,
            update_clip_norm=_floats(rng),
            seed=rng.randint(0, 2**40),
            goldfish=GoldfishPlan(k=rng.randint(2, 8), h=rng.randint(1, 32), seed=rng.randint(0, 2**40)),
            record_dp=RecordDPPlan(noise_multiplier=_floats(rng), max_grad_norm=_floats(rng), delta=1e-5),
        )
        audit = AuditPlan(
            prefixes=tuple(rng.sample(range(1, 600), 3)),
            suffix_tokens=50,
            exposure_candidates=rng.randint(2, 1000),
            frequency_penalty=rng.uniform(0.0, 10.0),
        )
        task = Task(TaskKind.EVALUATE, round=rng.randint(1, 9), training=plan, audit=audit)

        assert task_from_proto(task_to_proto(task)) == task


def test_gpu_training_settings_and_the_schedule_round_trip() -> None:
    rng = random.Random(19)
    for _ in range(8):
        batch_size = rng.randint(1, 64)
        local_steps = rng.randint(1, 50)
        rounds = rng.randint(1, 20)
        start = rng.randrange(rounds) * local_steps
        plan = TrainingPlan(
            local_steps=local_steps,
            batch_size=batch_size,
            micro_batch_size=rng.choice([None, rng.randint(1, batch_size)]),
            gradient_checkpointing=rng.random() < 0.5,
            packing=rng.random() < 0.5,
            lr_schedule=rng.choice(["constant", "linear", "cosine"]),
            warmup_steps=rng.randint(0, 100),
            min_lr_ratio=rng.choice([0.0, 0.1, 0.5, 1.0]),
            precision=rng.choice(["auto", "bf16", "fp32"]),
            seed=rng.randint(0, 2**40),
            schedule_start=start,
            schedule_steps=rounds * local_steps,
        )
        task = Task(TaskKind.TRAIN, round=start // local_steps + 1, training=plan)

        assert task_from_proto(task_to_proto(task)) == task


def test_waiting_task_without_version_round_trips() -> None:
    task = Task(TaskKind.WAIT, round=3, retry_after_ms=250)

    assert task_from_proto(task_to_proto(task)) == task


def test_a_finished_task_carries_why_the_run_is_over() -> None:
    task = Task(TaskKind.FINISHED, round=2, reason="an operator stopped the run at round 2: budget review")

    assert task_from_proto(task_to_proto(task)) == task


def test_upload_header_round_trips_with_and_without_manifest() -> None:
    rng = random.Random(11)
    for manifest in (None, _manifest(rng)):
        header = UploadHeader(
            worker_id="legal",
            run_id="run-1",
            round=2,
            kind=UploadKind.DELTA if manifest is None else UploadKind.INITIAL,
            base_version=1,
            num_examples=321,
            total_size=4096,
            chunk_count=1,
            sha256=rng.randbytes(32),
            dtype="float32",
            manifest=manifest,
            artifact_config_json="{}" if manifest else "",
            train_loss=1.5,
        )

        assert upload_header_from_proto(upload_header_to_proto(header)) == header


def test_run_spec_and_metrics_round_trip() -> None:
    spec = RunSpec(
        run_id="run-1",
        mode="qlora",
        aggregation="ffa",
        base_model="/models/base",
        lora=LoraSpec(rank=16, alpha=32, dropout=0.0, target_modules=("q_proj", "v_proj")),
        total_rounds=5,
        seed=9,
    )
    report = MetricsReport("finance", "run-1", 3, 3, 2.5, 1234, 2.75, 1500.0)

    assert run_spec_from_proto(run_spec_to_proto(spec)) == spec
    assert metrics_from_proto(metrics_to_proto(report)) == report


def test_metrics_with_record_epsilon_and_memorization_round_trip() -> None:
    rng = random.Random(17)

    def rates() -> MemorizationRates:
        return MemorizationRates(rng.randint(1, 40), *(_floats(rng) for _ in range(5)))

    memo = Memorization(rates(), {"10x": rates(), "1x": rates(), "control": rates()})
    for epsilon in (None, 0.0, 3.25):
        report = MetricsReport("legal", "run-1", 2, 2, 2.5, 99, record_epsilon=epsilon, memorization=memo)

        assert metrics_from_proto(metrics_to_proto(report)) == report


def test_an_unspecified_kind_is_refused() -> None:
    from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb

    with pytest.raises(ValueError, match="TaskKind"):
        task_from_proto(pb.Task(kind=pb.TASK_KIND_UNSPECIFIED))
    with pytest.raises(ValueError, match="UploadKind"):
        upload_header_from_proto(pb.UploadHeader(kind=pb.UPLOAD_KIND_UNSPECIFIED))


def test_a_run_spec_no_coordinator_sends_is_refused_naming_the_field() -> None:
    from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb

    lora = pb.LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj"])
    good = pb.RunSpec(run_id="r", mode="lora", aggregation="fedavg", base_model="m", lora=lora, total_rounds=1)

    assert run_spec_from_proto(good).lora.rank == 8
    with pytest.raises(ValueError, match="mode"):
        run_spec_from_proto(pb.RunSpec(run_id="r", mode="sparse", aggregation="fedavg", lora=lora, total_rounds=1))
    with pytest.raises(ValueError, match="rank"):
        run_spec_from_proto(
            pb.RunSpec(run_id="r", mode="lora", aggregation="fedavg", lora=pb.LoraSpec(rank=0), total_rounds=1)
        )
