"""A coordinator in-process on port 0 and three real workers (threads), once per training mode."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora_common.plans import RunSpec
from fedlora_common.privacy import gaussian_epsilon
from fedlora_common.secagg import identity_keypair
from fedlora_lab.datagen import DataSpec, generate_site, write_site
from fedlora_lab.federation import site_names
from fedlora_lab.model_factory import MadeModel
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import WorkerSettings
from fedlora_worker.daemon import Worker, WorkerOutcome
from fedlora_worker.data import load_records, tokenize
from fedlora_worker.dp_sgd import record_windows
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model
from fedlora_worker.transport import CoordinatorClient

ROUNDS = 2


def _run_federation(
    tmp_path: Path,
    base: Path,
    mode: str,
    *,
    secure: bool,
    rounds: int = ROUNDS,
    extra: dict | None = None,
    sites_extra: dict[str, dict] | None = None,
) -> tuple[dict, list[WorkerOutcome]]:
    """One run; `extra` adds to run.yaml, `sites_extra[worker]` to that worker's worker.yaml."""
    sites = site_names(3)
    tokens = {worker: f"secret-{worker}" for worker, _ in sites}
    identities = {worker: identity_keypair() for worker, _ in sites}
    peers = {worker: keys.public.hex() for worker, keys in identities.items()}
    settings = RunSettings.model_validate(
        {
            "run_id": f"it-{mode}",
            "base_model": str(base),
            "mode": mode,
            "rounds": rounds,
            "min_workers": 3,
            "workers": [
                {"id": w, "token_sha256": hashlib.sha256(t.encode()).hexdigest(), "identity_public": peers[w]}
                for w, t in tokens.items()
            ],
            "secure_aggregation": {"enabled": secure},
            "state_dir": tmp_path / "coordinator",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},  # no dropout: threads share torch's global RNG
            "training": {"local_steps": 4, "batch_size": 4, "max_seq_len": 64, "learning_rate": 3e-3},
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 50},
            **(extra or {}),
        }
    )
    outcomes: list[WorkerOutcome] = []
    errors: list[BaseException] = []
    loading = threading.Lock()

    def load_one_at_a_time(run: RunSpec, site: SiteModel) -> LoadedModel:
        # Each site is its own process in production; transformers' loading is not thread-safe.
        with loading:
            return load_model(run, site)

    with CoordinatorServer(settings=settings) as server:

        def work(worker_id: str, domain: str, index: int) -> None:
            key_file = tmp_path / f"{worker_id}.key"
            key_file.write_text(identities[worker_id].private.hex())
            paths = write_site(
                tmp_path / worker_id,
                generate_site(domain, DataSpec(n_train=16, n_eval=4, n_canaries=2, n_controls=1, seed=index)),  # type: ignore[arg-type]
            )
            worker_settings = WorkerSettings.model_validate(
                {
                    "worker_id": worker_id,
                    "token": tokens[worker_id],
                    "coordinator": f"127.0.0.1:{server.port}",
                    "base_model": str(base),
                    "data": {
                        "train": [paths.train],
                        "eval": [paths.eval],
                        "canaries": [paths.canaries, paths.controls],
                    },
                    "progress": False,
                    "identity_key": key_file,
                    "peers": peers,
                    **(sites_extra or {}).get(worker_id, {}),
                }
            )
            client = CoordinatorClient(
                target=worker_settings.coordinator,
                worker_id=worker_id,
                token=tokens[worker_id],
                retry=worker_settings.retry,
            )
            try:
                with Worker(
                    settings=worker_settings,
                    client=client,
                    metrics=WorkerMetrics(CollectorRegistry()),
                    load=load_one_at_a_time,
                ) as w:
                    outcomes.append(w.run())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w, d, i), name=w) for i, (w, d) in enumerate(sites)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not errors, errors
        assert server.wait_finished()
        server.write_report()
    return json.loads((settings.state_dir / "report.json").read_text()), outcomes


def _numel(artifact: Path) -> int:
    """Elements of the committed global state: what each worker uploads a delta of."""
    return sum(t.size for f in artifact.glob("*.safetensors") for t in load_file(str(f)).values())


def _records(tmp_path: Path, base: Path, max_seq_len: int) -> dict[str, int]:
    """Each site's training records as DP-SGD counts them (whole records, however many windows)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    return {
        worker: len(
            record_windows(
                tokenize(load_records([tmp_path / worker / "train.jsonl"]), tokenizer, max_seq_len=max_seq_len)
            )
        )
        for worker, _ in site_names(3)
    }


def _weighted(rates: list[dict | None], name: str) -> float:
    """A rate over several groups, weighted by how many canaries each measured."""
    measured = [r for r in rates if r is not None and r["count"] > 0]
    return sum(r[name] * r["count"] for r in measured) / sum(r["count"] for r in measured)


def _logits(model: torch.nn.Module, base: Path) -> torch.Tensor:
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_three_workers_train_and_the_final_model_loads_and_differs_from_the_base(
    tmp_path: Path, lab_model: MadeModel, mode: str
) -> None:
    report, outcomes = _run_federation(tmp_path, lab_model.path, mode, secure=mode == "lora")

    assert sorted(o.rounds_trained for o in outcomes) == [ROUNDS] * 3
    assert all(o.finished for o in outcomes)
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(len(r["participants"]) == 3 and not r["dropped"] for r in report["rounds"])
    assert report["base_eval_loss"] is not None
    assert all(r["eval_loss"] is not None for r in report["rounds"])
    # Three deltas of float32 (plain) or uint32 (masked, one more coordinate: the weight) per round.
    adapter = tmp_path / "coordinator" / report["adapter_path"]  # relative to the report's directory
    per_worker = _numel(adapter) + (1 if mode == "lora" else 0)
    assert [r["upload_bytes"] for r in report["rounds"]] == [3 * 4 * per_worker] * ROUNDS
    base = AutoModelForCausalLM.from_pretrained(lab_model.path)
    if mode == "full":
        tuned = AutoModelForCausalLM.from_pretrained(adapter)
    else:
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab_model.path), adapter)
    assert not torch.allclose(_logits(base, lab_model.path), _logits(tuned, lab_model.path), atol=1e-4)


def test_secure_aggregation_matches_plain_aggregation_within_the_quantization_bound(
    tmp_path: Path, lab_model: MadeModel
) -> None:
    secure_report, _ = _run_federation(tmp_path / "secure", lab_model.path, "lora", secure=True, rounds=1)
    plain_report, _ = _run_federation(tmp_path / "plain", lab_model.path, "lora", secure=False, rounds=1)

    secure = load_file(
        str(tmp_path / "secure" / "coordinator" / secure_report["adapter_path"] / "adapter_model.safetensors")
    )
    plain = load_file(
        str(tmp_path / "plain" / "coordinator" / plain_report["adapter_path"] / "adapter_model.safetensors")
    )
    # Each weighted coordinate is off by at most one quantization step (0.05 / (2**28 - 1) with 3 workers);
    # the mean divides by sum(w)/M, so the bound is 3 * step * M / sum(w) = 3 * step * 65536 / (3 * 16).
    bound = 3 * (0.05 / (2**28 - 1)) * 65536 / (3 * 16)
    worst = max(float(np.abs(secure[name] - plain[name]).max()) for name in plain)
    assert secure_report["secure_aggregation"] is True
    assert plain_report["secure_aggregation"] is False
    assert worst <= bound * 1.01
    assert any(float(np.abs(plain[name]).max()) > 100 * bound for name in plain if "lora_B" in name)
    stages = secure_report["rounds"][0]["secagg"]
    assert set(stages) == {"advertise", "share", "masked", "unmask"}
    assert stages["masked"]["bytes"] > 0


def test_a_run_with_dp_goldfish_secure_aggregation_and_audit_reports_epsilon_and_memorization(
    tmp_path: Path, lab_model: MadeModel
) -> None:
    # Prepare: every privacy setting on at once, audited every round on two short prefixes.
    extra = {
        "privacy": {
            "client_dp": {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5},
            "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
            "goldfish": {"k": 4, "h": 13},
        },
        "audit": {"every": 1, "prefixes": [10, 50], "exposure_candidates": 8},
    }

    # Execute
    report, outcomes = _run_federation(tmp_path, lab_model.path, "lora", secure=True, extra=extra)

    # Assert: it finished, every round reports the client-level epsilon the PLD accountant gives for
    # that many rounds, each site's record-level spend, and the audit's aggregates by group.
    assert all(o.finished for o in outcomes)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    expected = [gaussian_epsilon(1.0, steps=r, delta=1e-5) for r in range(1, ROUNDS + 1)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expected)
    assert all(r["delta"] == 1e-5 for r in rounds)
    sample_rates = [4 / n for n in _records(tmp_path, lab_model.path, max_seq_len=64).values()]
    spent = [max(gaussian_epsilon(1.0, steps=4 * r, sample_rate=q, delta=1e-5) for q in sample_rates) for r in (1, 2)]
    assert [r["record_epsilon"] for r in rounds] == pytest.approx(spent)  # the most any site spent
    assert report["privacy"]["client_level"]["placement"] == "distributed"
    assert report["privacy"]["goldfish"] == {"k": 4, "h": 13, "seed": 0}
    for r in rounds:
        memo = r["memorization"]
        assert memo["sites"] == 3
        groups = memo["by_duplication"]
        assert set(groups) == {"1x", "10x", "control"}
        assert groups["control"]["count"] == 3  # one control per site
        trained = [groups["1x"], groups["10x"]]
        assert memo["count"] == sum(g["count"] for g in trained if g is not None) == 6  # two canaries per site
        for name in ("exact_match_rate", "approx_match_rate", "token_accuracy"):  # overall: the trained groups
            assert memo[name] == pytest.approx(_weighted(trained, name))


RANKS = {"clinical": 4, "legal": 8, "finance": 16}
PRECISIONS = {"clinical": "nf4", "legal": "float32", "finance": "float32"}
ADAM = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def _fedadam_reference(
    before: dict[str, np.ndarray], mean: dict[str, np.ndarray], state: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Reddi et al. (2021) FedAdam on the unmasked mean, in float64, from its own state (m 0, v tau^2 at first)."""
    after = {}
    for name, delta in mean.items():
        m, v = state.get(name, (np.zeros_like(delta), np.full_like(delta, ADAM["tau"] ** 2)))
        m = ADAM["beta1"] * m + (1 - ADAM["beta1"]) * delta
        v = ADAM["beta2"] * v + (1 - ADAM["beta2"]) * delta**2
        state[name] = (m, v)
        after[name] = before[name].astype(np.float64) + ADAM["lr"] * m / (np.sqrt(v) + ADAM["tau"])
    return after


def test_sites_of_rank_4_8_and_16_one_on_nf4_federate_securely_under_fedadam_as_the_numpy_reference_says(
    tmp_path: Path, lab_model: MadeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: capture each site's unmasked update (delta, weight, rank) where the pipeline encodes it.
    from fedlora_common.blocks import truncate_to_rank
    from fedlora_worker import protect

    sent: dict[int, list[tuple[np.ndarray, int, int]]] = {}
    encode = protect.encode

    def spy(delta: np.ndarray, **kwargs: object) -> np.ndarray:
        params = kwargs["params"]
        weight = min(int(kwargs["examples"]), params.max_examples)  # type: ignore[attr-defined]
        sent.setdefault(params.tag, []).append((delta.copy(), weight, int(kwargs["site_rank"])))  # type: ignore[attr-defined]
        return encode(delta, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(protect, "encode", spy)
    extra = {
        "aggregation": "hetlora",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "base_precisions": ["nf4", "float32"],
        "server_optimizer": {"name": "fedadam", **ADAM},
    }
    sites = {
        w: {"lora": {"max_rank": r}, "base_precision": PRECISIONS[w], "dtype": "float32"} for w, r in RANKS.items()
    }

    # Execute
    report, outcomes = _run_federation(tmp_path, lab_model.path, "lora", secure=True, extra=extra, sites_extra=sites)

    # Assert: the report names each site's rank and precision; every round committed all three updates.
    assert all(o.finished for o in outcomes)
    assert {w["id"]: (w["rank"], w["base_precision"]) for w in report["workers"]} == {
        w: (r, PRECISIONS[w]) for w, r in RANKS.items()
    }
    assert report["aggregation"] == "hetlora"
    assert all(len(r["participants"]) == 3 for r in report["rounds"])
    # Each version is what FedAdam makes of the previous one and the unmasked updates' per-rank-index mean.
    versions = sorted((tmp_path / "coordinator" / "artifacts").glob("v*/adapter_model.safetensors"))
    assert len(versions) == ROUNDS + 1
    state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    names = [t["name"] for t in json.loads((versions[0].parent / "fedlora.json").read_text())["manifest"]]
    # One quantization step per coordinate (clip 0.05, 28 bits at three sites), times M / sum(w), through
    # Adam's step, whose slope in the mean is at most lr / tau.
    tag_order = sorted(sent)
    assert len(tag_order) == ROUNDS
    for round_, tag in enumerate(tag_order, start=1):
        before, after = load_file(str(versions[round_ - 1])), load_file(str(versions[round_]))
        updates = sent[tag]
        assert sorted(rank for _, _, rank in updates) == [4, 8, 16]
        mean = _group_mean_reference(before, names, updates)
        expected = _fedadam_reference(before, mean, state)
        total = sum(w for _, w, _ in updates)
        bound = 3 * (0.05 / (2**28 - 1)) * 65536 / min(w for _, w, _ in updates) * ADAM["lr"] / ADAM["tau"]
        for name in names:
            assert np.abs(after[name] - expected[name]).max() <= bound * 1.01 + 1e-6, (round_, name, total)
        moved = [name for name in names if not np.array_equal(after[name], before[name])]
        assert moved, "FedAdam moved nothing"
    # Rank indices 8..15 of A were trained by the rank-16 site alone; 4..7 by two sites; all moved.
    last = load_file(str(versions[-1]))
    a = next(n for n in names if "lora_A" in n)
    assert not np.array_equal(last[a][8:], load_file(str(versions[0]))[a][8:])
    # Each site's share of the global adapter loads with stock peft at its own rank.
    adapter = tmp_path / "coordinator" / report["adapter_path"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(lab_model.path), lab_model.path)
    for worker, rank in RANKS.items():
        own = tmp_path / f"adapter-{worker}"
        own.mkdir()
        (own / "adapter_config.json").write_text(json.dumps({**config, "r": rank, "lora_alpha": 32 * rank / 16}))
        from safetensors.numpy import save_file

        save_file(
            truncate_to_rank(load_file(str(adapter / "adapter_model.safetensors")), rank=16, site_rank=rank),
            str(own / "adapter_model.safetensors"),
        )
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab_model.path), own)
        assert tuned.peft_config["default"].r == rank
        logits = _logits(tuned, lab_model.path)
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, base_logits, atol=1e-5)


def _group_mean_reference(
    before: dict[str, np.ndarray], names: list[str], updates: list[tuple[np.ndarray, int, int]]
) -> dict[str, np.ndarray]:
    """Each rank index of each A row / B column averaged, weight by weight, over the sites whose rank covers it."""
    offsets, start = {}, 0
    for name in names:
        offsets[name] = (start, start + before[name].size)
        start += before[name].size
    mean = {}
    for name in names:
        lo, hi = offsets[name]
        shape = before[name].shape
        total = np.zeros(shape, dtype=np.float64)
        weight = np.zeros(shape, dtype=np.float64)
        for delta, w, rank in updates:
            covered = np.zeros(shape, dtype=bool)
            if "lora_A" in name:
                covered[:rank] = True
            else:
                covered[:, :rank] = True
            total += w * np.where(covered, delta[lo:hi].reshape(shape), 0.0)
            weight += w * covered
        mean[name] = np.divide(total, weight, out=np.zeros(shape), where=weight > 0)
    return mean
