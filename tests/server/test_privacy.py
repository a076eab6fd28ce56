"""Client-level DP at the coordinator: central noise of the stated size, budget stops, refused settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora_common.privacy import gaussian_epsilon
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from tests.server.conftest import MANIFEST, WORKERS, connect, initial_vector, run_settings, start_round_one

CENTRAL = {"clip_norm": 0.5, "noise_multiplier": 2.0, "delta": 1e-5, "placement": "central"}


def test_central_noise_has_std_z_c_over_n_and_the_mean_is_unweighted(tmp_path: Path) -> None:
    # Prepare: three clipped updates with very different example counts.
    settings = run_settings(tmp_path, rounds=1, privacy={"client_dp": CENTRAL})
    rng = np.random.default_rng(5)
    deltas = {w: rng.normal(size=MANIFEST.numel).astype(np.float32) for w in WORKERS}
    deltas = {w: d * np.float32(0.5 / np.linalg.norm(d)) for w, d in deltas.items()}
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        start_round_one(wire)
        task = wire.poll("clinical")
        assert task.training.update_clip_norm == 0.5  # the workers clip to the DP bound

        # Execute
        for w, examples in zip(WORKERS, (10, 1000, 100), strict=True):
            wire.upload(w, deltas[w], round_=1, examples=examples)
        _, payload = wire.download("legal", 1)

    # Assert: committed - (initial + unweighted mean) is the noise, N(0, (z C / n)^2) per coordinate.
    # 1,024 coordinates: the sample std has a relative standard error of 2.2%; 11% is 5 of them.
    noise = np.frombuffer(payload, dtype=np.float32) - initial_vector() - np.mean(list(deltas.values()), axis=0)
    assert np.std(noise) == pytest.approx(2.0 * 0.5 / 3, rel=0.11)
    assert abs(float(np.mean(noise))) < 5 * (2.0 * 0.5 / 3) / np.sqrt(noise.size)


def test_a_run_stops_cleanly_before_the_round_that_would_exceed_its_budget(tmp_path: Path) -> None:
    # Prepare: a budget that covers two rounds at z = 2 but not three.
    two, three = (gaussian_epsilon(2.0, steps=k, delta=1e-5) for k in (2, 3))
    budget = (two + three) / 2
    settings = run_settings(tmp_path, rounds=5, privacy={"client_dp": {**CENTRAL, "epsilon_budget": budget}})
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        start_round_one(wire)

        # Execute: two full rounds.
        for round_ in (1, 2):
            for w in WORKERS:
                assert wire.poll(w).kind == pb.TASK_KIND_TRAIN
                wire.upload(w, np.zeros(MANIFEST.numel, dtype=np.float32), round_=round_, base_version=round_ - 1)
            for w in WORKERS:
                assert wire.poll(w).kind == pb.TASK_KIND_EVALUATE
                wire.report(w, round_, round_, loss=2.0)

        # Assert: finished after round 2, with the spend reported per round.
        assert wire.poll("clinical").kind == pb.TASK_KIND_FINISHED
        server.write_report()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][-1]["epsilon"] == pytest.approx(two)
    assert report["rounds"][-1]["epsilon"] <= budget
    assert report["privacy"]["client_level"]["trust"].startswith("trusts the coordinator")


def test_a_target_epsilon_is_met_over_the_planned_rounds(tmp_path: Path) -> None:
    settings = run_settings(
        tmp_path, rounds=4, privacy={"client_dp": {"clip_norm": 1.0, "target_epsilon": 6.0, "placement": "central"}}
    )
    with CoordinatorServer(settings=settings) as server:
        privacy = server.coordinator.privacy
        assert privacy is not None
        z = privacy.noise_multiplier

    assert gaussian_epsilon(z, steps=4, delta=1e-5) <= 6.0
    assert gaussian_epsilon(z * 0.99, steps=4, delta=1e-5) > 6.0


@pytest.mark.parametrize(
    ("privacy", "secure", "field"),
    [
        ({"client_dp": {"clip_norm": 1, "target_epsilon": 0}}, True, "privacy.client_dp.target_epsilon"),
        ({"client_dp": {"clip_norm": 1, "target_epsilon": -1}}, True, "privacy.client_dp.target_epsilon"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "delta": 0}}, True, "privacy.client_dp.delta"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "delta": 1}}, True, "privacy.client_dp.delta"),
        ({"client_dp": {"noise_multiplier": 1}}, True, "clip_norm"),
        ({"record_dp": {"noise_multiplier": 1}}, True, "max_grad_norm"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "placement": "central"}}, True, "placement"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "placement": "distributed"}}, False, "placement"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "epsilon_budget": 0.5}}, True, "epsilon_budget"),
        ({"client_dp": {"clip_norm": 1, "noise_multiplier": 1, "target_epsilon": 3}}, True, "exactly one"),
        ({"goldfish": {"k": 1}}, True, "privacy.goldfish.k"),
        ({"goldfish": {"h": 0}}, True, "privacy.goldfish.h"),
    ],
)
def test_impossible_privacy_settings_are_refused_naming_the_field(
    tmp_path: Path, privacy: dict[str, object], secure: bool, field: str
) -> None:
    # Prepare: a run.yaml with workers that have identities, so secure aggregation itself is valid.
    workers = [
        {"id": w, "token_sha256": "0" * 63 + str(i), "identity_public": "ab" * 32} for i, w in enumerate(WORKERS)
    ]
    path = tmp_path / "run.yaml"
    config = {"base_model": "m", "workers": workers, "secure_aggregation": {"enabled": secure}, "privacy": privacy}
    path.write_text(json.dumps(config))

    # Execute / Assert: one line, naming the field.
    with pytest.raises(ConfigError, match=field) as caught:
        load_settings(RunSettings, ["--config", str(path)])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("setting", ["packing", "gradient_checkpointing"])
def test_record_dp_with_packing_or_checkpointing_is_refused_at_load(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "run.yaml"
    config = {
        "base_model": "m",
        "workers": [{"id": w, "token_sha256": "0" * 63 + str(i)} for i, w in enumerate(WORKERS)],
        "secure_aggregation": {"enabled": False},
        "training": {setting: True},
        "privacy": {"record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
    }
    path.write_text(json.dumps(config))

    with pytest.raises(ConfigError, match=f"training.{setting}: not with privacy.record_dp"):
        load_settings(RunSettings, ["--config", str(path)])
