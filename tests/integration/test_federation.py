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
    tmp_path: Path, base: Path, mode: str, *, secure: bool, rounds: int = ROUNDS, extra: dict | None = None
) -> tuple[dict, list[WorkerOutcome]]:
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
