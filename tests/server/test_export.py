"""`fedlora-server export`: the final adapter as real files that stock peft loads, its report, and a model card
that says how it was trained; refused, with nothing written, before a round is committed."""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from fedlora_common.chunking import sha256
from fedlora_common.manifest import flatten
from fedlora_common.messages import Memorization, MemorizationRates, MetricsReport, UploadHeader, UploadKind
from fedlora_common.plans import LoraSpec, RunSpec
from fedlora_lab.model_factory import MadeModel
from fedlora_server.cli import main
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import SqliteStore
from fedlora_worker.modeling import SiteModel, artifact_config_json, global_state, load_model
from tests.server.conftest import WORKERS, Clock, initialized, run_settings, upload_header, vector_chunks
from tests.server.statedir import files_of, one_round_committed

EXAMPLES = {"clinical": 120, "finance": 80, "legal": 100}
PRIVACY = {
    "client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.5, "delta": 1e-5, "placement": "central"},
    "record_dp": {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-6},
    "goldfish": {"k": 4, "h": 13},
}
RATES = {"control": (4, 0.0, 0.25), "1x": (6, 1 / 6, 0.5), "10x": (3, 2 / 3, 0.875)}
"""Per duplication group: canaries, exact-match rate, token accuracy (what each site reports)."""


def _rates(count: int, exact: float, accuracy: float) -> MemorizationRates:
    return MemorizationRates(count, exact, exact, accuracy, exact, 3.5)


def _audited(worker: str, round_: int) -> MetricsReport:
    groups = {group: _rates(*values) for group, values in RATES.items()}
    return MetricsReport(
        worker, "test-run", round_, round_, eval_loss=2.5, eval_tokens=50, record_epsilon=0.8 + 0.1 * len(worker),
        memorization=Memorization(overall=groups["1x"], by_duplication=groups),
    )  # fmt: skip


def _trained_state(state_dir: Path, base: Path) -> Any:
    """A run on the lab model that committed round 1 of 1: its initial adapter as a worker makes it, the
    coordinator's mean of three small updates (and its central DP noise) on top; sites audited. Its settings."""
    settings = run_settings(state_dir, base_model=str(base), rounds=1, lora={"rank": 4, "alpha": 8}, privacy=PRIVACY)
    loaded = load_model(
        RunSpec(
            run_id="test-run", mode="lora", aggregation="fedavg", base_model=str(base),
            lora=LoraSpec(rank=4, alpha=8), total_rounds=1, seed=0,
        ),
        SiteModel(path=str(base)),
    )  # fmt: skip
    initial = flatten(loaded.manifest, global_state(loaded))
    store = SqliteStore(state_dir / "coordinator.db")
    coordinator = Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock())
    for worker, examples in EXAMPLES.items():
        coordinator.join(worker, examples)
    coordinator.poll("clinical")
    payload = initial.tobytes()
    header = UploadHeader(
        worker_id="clinical", run_id="test-run", round=0, kind=UploadKind.INITIAL, base_version=0, num_examples=120,
        total_size=len(payload), chunk_count=-(-len(payload) // 1024), sha256=sha256(payload), dtype="float32",
        manifest=loaded.manifest, artifact_config_json=artifact_config_json(loaded),
    )  # fmt: skip
    coordinator.receive_upload(header, vector_chunks(initial))
    for worker in WORKERS:
        coordinator.report_metrics(MetricsReport(worker, "test-run", 0, 0, eval_loss=3.0, eval_tokens=50))
    rng = np.random.default_rng(3)
    for worker in WORKERS:
        delta = (rng.normal(size=initial.size) * 0.5 / np.sqrt(initial.size)).astype(np.float32)
        coordinator.receive_upload(upload_header(worker, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    for worker in WORKERS:
        coordinator.report_metrics(_audited(worker, 1))
    assert coordinator.finished.is_set()
    store.close()
    return settings


@pytest.fixture(scope="module")
def trained(lab_model: MadeModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of that run (exports only read it)."""
    state = tmp_path_factory.mktemp("trained") / "state"
    settings = _trained_state(state, lab_model.path)
    (state.parent / "run.yaml").write_text(settings.model_dump_json())
    return state


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.arange(1, 25).reshape(2, 12)).logits  # type: ignore[no-any-return]


def test_the_exported_adapter_is_real_files_that_stock_peft_loads_as_the_committed_version(
    trained: Path, lab_model: MadeModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "handover"

    # Execute
    code, stdout, err = _run(capsys, "export", "--config", trained.parent / "run.yaml", "--out", out)

    # Assert: files, not links; peft loads them; the weights are the committed version's; the run's report beside.
    assert code == 0, err
    assert stdout.startswith(
        f"exported version 1 (round 1) of run test-run to {out}: adapter_config.json, adapter_model.safetensors, "
        "fedlora.json, report.json, README.md ("
    )
    assert stdout.count("\n") == 1
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab_model.path), out)
    committed = load_file(str(trained / "artifacts" / "v000001" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(tuned)
    assert sorted(loaded) == sorted(committed)
    for name, tensor in committed.items():
        np.testing.assert_array_equal(loaded[name].numpy(), tensor)
    base = AutoModelForCausalLM.from_pretrained(lab_model.path)
    assert not torch.allclose(_logits(base), _logits(tuned), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["run_id"] == "test-run"
    assert report["adapter_path"] == "."  # relative to the report's directory, as in the state directory


def test_the_model_card_says_how_the_adapter_was_trained_and_how_to_load_it(
    trained: Path, lab_model: MadeModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "card"

    code, _, err = _run(capsys, "export", "--state-dir", trained, "--out", out)

    assert code == 0, err
    card = (out / "README.md").read_text()
    expected = [
        "library_name: peft",
        f"| base model | `{lab_model.path}` |",
        "| mode | LoRA on a float base (`lora`) |",
        "| LoRA | rank 4, alpha 8, dropout 0.05, targets all-linear |",
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (14 modules)",
        "| rounds | 1 committed of 1 planned;",
        "unweighted (client-level DP) (`fedavg`)",
        "| secure aggregation | off: the coordinator saw each site's update |",
        "| held-out loss | 3.000 (base model), 2.500 after round 1 |",
        "| clinical | 120 |",
        "| finance | 80 |",
        "| legal | 100 |",
        "- Client-level DP: DP-FedAvg, central noise",
        "noise multiplier 1.500, clip 1.0: epsilon ",
        "at delta 1e-05 after 1 round (",
        "- Record-level DP: DP-SGD",
        "epsilon 1.60 (the largest of any site) at delta 1e-06",
        "- Goldfish loss: on, k = 4, h = 13",
        "Canary audit of round 1, by 3 sites",
        "trained with FedLoRA by 3 sites over 1 federated round, secure aggregation off",
        "| control | 12 | 0.000 | 0.000 | 0.250 | 0.000 | 3.50 |",
        "| 1x | 18 | 0.167 | 0.167 | 0.500 | 0.167 | 3.50 |",
        "| 10x | 9 | 0.667 | 0.667 | 0.875 | 0.667 | 3.50 |",
        f'model = PeftModel.from_pretrained(base, "{out}")',
        f"fedlora-lab merge --base {lab_model.path} --adapter {out} --out merged",
    ]
    assert [line for line in expected if line not in card] == []
    assert "epsilon –" not in card  # the client-level spend is stated, not left blank


def test_an_export_before_any_round_is_committed_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run that committed only its initial version 0 (no training in it).
    state = tmp_path / "state"
    store = SqliteStore(state / "coordinator.db")
    initialized(Coordinator(settings=run_settings(state), store=store, metrics=ServerMetrics(CollectorRegistry())))
    store.close()
    before = files_of(tmp_path)

    # Execute
    code, out, err = _run(capsys, "export", "--state-dir", state, "--out", tmp_path / "out")

    # Assert
    assert code == 2
    assert err == f"fedlora-server export: {state}: run 'test-run' has committed no round yet; nothing to export\n"
    assert out == ""
    assert files_of(tmp_path) == before


@pytest.mark.parametrize(
    ("setup", "argv", "named"),
    [
        (lambda tmp: (tmp / "out").mkdir() or (tmp / "out" / "x").write_text("mine"), ["--state-dir", "{state}"],
         "out: exists and is not empty; an export never overwrites"),
        (lambda tmp: None, ["--state-dir", "{tmp}"], "holds no coordinator.db"),
        (lambda tmp: None, ["--config", "{tmp}/other.yaml"], "holds run 'test-run', not 'other-run'"),
        (lambda tmp: None, ["--state-dir", "{state}", "--config", "{tmp}/other.yaml"], "not allowed with argument"),
    ],
    ids=["out not empty", "no database", "another run", "two states"],
)  # fmt: skip
def test_a_refused_export_says_why_in_one_line_and_writes_nothing(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any, argv: list[str], named: str
) -> None:
    other = run_settings(trained, run_id="other-run")
    (tmp_path / "other.yaml").write_text(other.model_dump_json())
    setup(tmp_path)
    before = files_of(tmp_path), files_of(trained)

    args = [a.format(state=trained, tmp=tmp_path) for a in argv]
    code, out, err = _run(capsys, "export", *args, "--out", tmp_path / "out")

    assert code == 2
    assert named in err
    assert err.count("\n") == 1, err
    assert out == ""
    assert (files_of(tmp_path), files_of(trained)) == before


def test_a_damaged_final_version_is_refused_naming_it(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a copy of the run whose version 1 has a byte changed.
    state = tmp_path / "state"
    shutil.copytree(trained, state, symlinks=True)
    weights = state / "artifacts" / "v000001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0xFF
    weights.write_bytes(bytes(data))

    code, _, err = _run(capsys, "export", "--state-dir", state, "--out", tmp_path / "out")

    assert code == 2
    assert err.startswith(f"fedlora-server export: {weights.parent}: version 1 cannot be read (")
    assert ".export-" not in err  # names the damaged version, not the copy it was found in
    assert err.endswith("; nothing exported\n")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_a_full_fine_tuning_run_exports_a_model_and_its_card_says_to_load_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a full fine-tuning run, no privacy, never audited, that committed round 1.
    state = tmp_path / "state"
    one_round_committed(state, mode="full")

    # Execute
    code, _, err = _run(capsys, "export", "--state-dir", state, "--out", tmp_path / "out")

    # Assert
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "fedlora.json",
        "model.safetensors",
        "report.json",
    ]
    card = (tmp_path / "out" / "README.md").read_text()
    expected = [
        "library_name: transformers",
        "A fully fine-tuned model for `tiny`",
        f'model = AutoModelForCausalLM.from_pretrained("{tmp_path / "out"}")',
        "| mode | full fine-tuning (every weight) (`full`) |",
        "FedAvg, every weight averaged, weighted by examples (`fedavg`)",
        "- Client-level DP: off.",
        "- Record-level DP: off.",
        "- Goldfish loss: off.",
        "No round was audited.",
    ]
    assert [line for line in expected if line not in card] == []
    assert "PeftModel" not in card
    assert "| LoRA |" not in card


def test_a_run_whose_stored_settings_no_longer_load_asks_for_its_run_yaml(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a copy of the run whose pinned settings carry a key this version does not know.
    state = tmp_path / "state"
    shutil.copytree(trained, state, symlinks=True)
    with closing(sqlite3.connect(state / "coordinator.db")) as db, db:
        (config,) = db.execute("SELECT config_json FROM run").fetchone()
        db.execute("UPDATE run SET config_json = ?", (json.dumps({**json.loads(config), "from_the_future": 1}),))

    code, _, err = _run(capsys, "export", "--state-dir", state, "--out", tmp_path / "out")

    assert code == 2
    assert err.startswith(f"fedlora-server export: {state}: the run's stored settings do not load here (")
    assert "from_the_future" in err
    assert err.endswith("give --config run.yaml\n")
    assert not (tmp_path / "out").exists()
