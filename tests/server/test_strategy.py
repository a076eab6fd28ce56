"""Strategies: how the round's mean update becomes the next global model, and how their state outlives a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.aggregation import apply_update
from fedlora_common.manifest import Manifest, TensorSpec, update_manifest
from fedlora_server.backup import create_backup
from fedlora_server.coordinator import Coordinator, build_strategy
from fedlora_server.metrics import ServerMetrics
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.restore import restore_backup
from fedlora_server.store import MemoryStore, SqliteStore, StateError
from fedlora_server.strategy import CentralNoise, FedAdam, FedAvg, FedAvgM, FedYogi, OptimizerState, Strategy
from fedlora_server.versions import Versions
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, WORKERS, Clock, run_settings
from tests.server.statedir import one_round_committed

FFA = update_manifest(MANIFEST, "ffa")
HYPER = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
ROUNDS = 5
OPTIMIZERS: dict[str, Strategy] = {
    "fedavgm": FedAvgM(weighting="examples", lr=HYPER["lr"], beta1=HYPER["beta1"]),
    "fedadam": FedAdam(weighting="examples", **HYPER),
    "fedyogi": FedYogi(weighting="examples", **HYPER),
}


def _initial() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.0, MANIFEST.numel).astype(np.float32)


def _deltas(numel: int, rounds: int = ROUNDS) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(0.0, 0.01, numel).astype(np.float32) for _ in range(rounds)]


def _reference(name: str, x0: np.ndarray, deltas: Sequence[np.ndarray]) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, in the clear and in float64: m from 0, v from tau^2."""
    lr, beta1, beta2, tau = HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["tau"]
    x = x0.astype(np.float64)
    m, v = np.zeros_like(x), np.full_like(x, tau**2)
    for delta in deltas:
        d = delta.astype(np.float64)
        if name == "fedavgm":
            m = beta1 * m + d
            x = x + lr * m
            continue
        m = beta1 * m + (1 - beta1) * d
        adam = beta2 * v + (1 - beta2) * d * d
        yogi = v - (1 - beta2) * d * d * np.sign(v - d * d)
        v = adam if name == "fedadam" else yogi
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


def _run(
    strategy: Strategy, x: np.ndarray, manifest: Manifest, sent: Manifest, deltas: Sequence[np.ndarray]
) -> tuple[np.ndarray, OptimizerState]:
    state = strategy.fresh_state(sent.numel)
    for delta in deltas:
        x, state = strategy.next_state(x, manifest, sent, delta, state, contributors=3)
    return x, state


def _within_float32_rounding(got: np.ndarray, want: np.ndarray, rounds: int) -> None:
    """Each round rounds the new global vector to float32 once (and its step once)."""
    assert got.dtype == np.float32
    tolerance = 2 * rounds * np.finfo(np.float32).eps * float(np.abs(want).max())
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tolerance)


# ---- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [MANIFEST, FFA], ids=["fedavg", "ffa"])
def test_fedavg_is_apply_update_bit_for_bit(sent: Manifest) -> None:
    x, delta = _initial(), _deltas(sent.numel, 1)[0]

    got, state = FedAvg(weighting="examples").next_state(x, MANIFEST, sent, delta, {}, contributors=3)

    assert np.array_equal(got, apply_update(x, MANIFEST, sent, delta))
    assert got.dtype == np.float32
    assert state == {}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_server_optimizer_follows_the_reference_over_rounds(name: str) -> None:
    x0, deltas = _initial(), _deltas(MANIFEST.numel)

    got, _ = _run(OPTIMIZERS[name], x0, MANIFEST, MANIFEST, deltas)

    want = _reference(name, x0, deltas)
    _within_float32_rounding(got, want, ROUNDS)
    assert not np.allclose(want, x0.astype(np.float64) + np.sum(deltas, axis=0), atol=1e-4)  # not plain FedAvg


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_server_optimizer_under_ffa_moves_only_the_b_tensors(name: str) -> None:
    x0, deltas = _initial(), _deltas(FFA.numel)

    got, state = _run(OPTIMIZERS[name], x0, MANIFEST, FFA, deltas)

    where = MANIFEST.offsets()
    for spec in MANIFEST.tensors:
        start, stop = where[spec.name]
        if ".lora_B." in spec.name:
            _within_float32_rounding(got[start:stop], _reference(name, x0[start:stop], deltas), ROUNDS)
        else:
            assert np.array_equal(got[start:stop], x0[start:stop])
    assert all(a.shape == (FFA.numel,) for a in state.values())


def test_the_optimizer_state_starts_at_zero_momentum_and_tau_squared() -> None:
    state = OPTIMIZERS["fedadam"].fresh_state(7)

    assert np.array_equal(state["m"], np.zeros(7))
    assert np.array_equal(state["v"], np.full(7, HYPER["tau"] ** 2))
    assert not FedAvg(weighting="examples").stateful
    assert OPTIMIZERS["fedavgm"].state_names == ("m",)


# ---- central noise ----------------------------------------------------------------------------


def test_central_noise_adds_gaussian_noise_of_std_zc_over_n_to_the_mean() -> None:
    numel = 200_000
    sent = Manifest((TensorSpec("w", (numel,)),))
    noised = CentralNoise(
        FedAvg(weighting="uniform"), noise_multiplier=2.0, clip_norm=0.5, rng=lambda: np.random.default_rng(5)
    )

    got, _ = noised.next_state(
        np.zeros(numel, np.float32), sent, sent, np.full(numel, 0.25, np.float32), {}, contributors=3
    )

    noise = got.astype(np.float64) - 0.25
    assert abs(noise.mean()) < 5 * (2.0 * 0.5 / 3) / np.sqrt(numel)
    assert noise.std() == pytest.approx(2.0 * 0.5 / 3, rel=0.01)


def test_central_noise_reaches_the_inner_optimizer_and_keeps_its_state_names() -> None:
    inner = FedAdam(weighting="uniform", **HYPER)
    noised = CentralNoise(inner, noise_multiplier=1.0, clip_norm=1.0, rng=lambda: np.random.default_rng(5))
    x0, delta = _initial(), _deltas(MANIFEST.numel, 1)[0]
    expected_noise = np.random.default_rng(5).normal(0.0, 1.0 / 4, MANIFEST.numel)

    got, state = noised.next_state(x0, MANIFEST, MANIFEST, delta, noised.fresh_state(MANIFEST.numel), contributors=4)

    want, want_state = inner.next_state(
        x0,
        MANIFEST,
        MANIFEST,
        (delta + expected_noise).astype(np.float32),
        inner.fresh_state(MANIFEST.numel),
        contributors=4,
    )
    assert np.array_equal(got, want)
    assert np.array_equal(state["v"], want_state["v"])
    assert noised.state_names == ("m", "v")
    assert noised.weighting == "uniform"


def test_central_noise_refuses_a_strategy_weighting_by_examples() -> None:
    with pytest.raises(ValueError, match="uniform weighting"):
        CentralNoise(FedAvg(weighting="examples"), noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0])
def test_central_noise_refuses_updates_not_clipped_to_a_positive_norm(clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        CentralNoise(FedAvg(weighting="uniform"), noise_multiplier=1.0, clip_norm=clip_norm)


def test_the_coordinator_builds_the_optimizer_settings_name_with_central_noise_around_it(tmp_path: Path) -> None:
    settings = run_settings(
        tmp_path,
        server_optimizer={"name": "fedyogi", "lr": 0.5},
        privacy={"client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.1, "placement": "central"}},
    )

    strategy = build_strategy(settings, ClientPrivacy.from_settings(settings))

    assert isinstance(strategy, CentralNoise)
    assert strategy.inner == FedYogi(weighting="uniform", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    assert strategy.noise_multiplier == 1.1
    assert build_strategy(run_settings(tmp_path), None) == FedAvg(weighting="examples")


# ---- its state across restarts ------------------------------------------------------------------


def _versions(state_dir: Path, store: SqliteStore | MemoryStore, strategy: Strategy) -> Versions:
    return Versions(
        state_dir=state_dir, mode="lora", aggregation="fedavg", store=store, clock=Clock(), strategy=strategy
    )


def _commit_rounds(versions: Versions, deltas: Sequence[np.ndarray], first_round: int) -> np.ndarray:
    for number, delta in enumerate(deltas, start=first_round):
        assert versions.current is not None
        versions.commit_update(versions.current, delta, number, contributors=3)
    assert versions.current is not None
    return versions.current.vector


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_optimizer_state_survives_a_restart_bit_for_bit(tmp_path: Path, name: str) -> None:
    # Prepare: one run commits three rounds; another commits two, stops, and restarts on its state directory.
    strategy, deltas = OPTIMIZERS[name], _deltas(MANIFEST.numel, 3)
    whole = _versions(tmp_path / "whole", MemoryStore(), strategy)
    whole.commit_initial(_initial(), ADAPTER_CONFIG, MANIFEST)
    uninterrupted = _commit_rounds(whole, deltas, 1)
    state = tmp_path / "stopped"
    store = SqliteStore(state / "coordinator.db")
    stopped = _versions(state, store, strategy)
    stopped.commit_initial(_initial(), ADAPTER_CONFIG, MANIFEST)
    _commit_rounds(stopped, deltas[:2], 1)
    store.close()

    # Execute
    store = SqliteStore(state / "coordinator.db")
    restarted = _versions(state, store, strategy)
    restarted.restore()
    resumed = _commit_rounds(restarted, deltas[2:], 3)
    store.close()

    # Assert
    assert np.array_equal(resumed, uninterrupted)
    assert sorted(p.name for p in (state / "optimizer").iterdir()) == ["v000001.npz", "v000002.npz", "v000003.npz"]


def test_a_missing_optimizer_state_refuses_the_restart_naming_the_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "coordinator.db")
    versions = _versions(tmp_path, store, OPTIMIZERS["fedadam"])
    versions.commit_initial(_initial(), ADAPTER_CONFIG, MANIFEST)
    _commit_rounds(versions, _deltas(MANIFEST.numel, 2), 1)
    (tmp_path / "optimizer" / "v000002.npz").unlink()

    with pytest.raises(StateError, match=r"optimizer/v000002\.npz: missing; the server optimizer's state"):
        _versions(tmp_path, store, OPTIMIZERS["fedadam"]).restore()
    restarted = _versions(tmp_path, store, FedAvg(weighting="examples"))
    assert restarted.restore() is not None  # a stateless strategy needs none
    store.close()


def test_the_initial_version_resumes_with_the_fresh_state(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "coordinator.db")
    strategy = OPTIMIZERS["fedyogi"]
    _versions(tmp_path, store, strategy).commit_initial(_initial(), ADAPTER_CONFIG, MANIFEST)
    delta = _deltas(MANIFEST.numel, 1)

    restarted = _versions(tmp_path, store, strategy)
    restarted.restore()
    resumed = _commit_rounds(restarted, delta, 1)
    store.close()

    assert np.array_equal(resumed, _run(strategy, _initial(), MANIFEST, MANIFEST, delta)[0])
    assert not (tmp_path / "optimizer" / "v000000.npz").exists()


ADAM = {"server_optimizer": {"name": "fedadam", "lr": 0.1}}


def test_a_coordinator_missing_its_optimizer_state_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one_round_committed(state, **ADAM)
    (state / "optimizer" / "v000001.npz").unlink()
    config = tmp_path / "run.json"
    config.write_text(json.dumps(json.loads(run_settings(state, **ADAM).model_dump_json())))

    finished = subprocess.run(
        [sys.executable, "-m", "fedlora_server", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    assert "optimizer/v000001.npz: missing" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_backup_carries_the_optimizer_state_and_its_restore_resumes(tmp_path: Path) -> None:
    state, restored = tmp_path / "state", tmp_path / "restored"
    committed = one_round_committed(state, **ADAM)

    backup = create_backup(state, tmp_path / "backup.tar.gz")
    restore_backup(backup.path, restored)

    assert "optimizer/v000001.npz" in backup.manifest.files
    saved = (state / "optimizer" / "v000001.npz").read_bytes()
    assert (restored / "optimizer" / "v000001.npz").read_bytes() == saved
    store = SqliteStore(restored / "coordinator.db")
    resumed = Coordinator(
        settings=run_settings(restored, **ADAM), store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock()
    )
    for w in WORKERS:
        resumed.join(w, 100)
    np.testing.assert_array_equal(resumed.global_model("legal", 1).vector, committed)
    store.close()
