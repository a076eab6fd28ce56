"""The capacity planner: its bytes are what bench/comm.py counts on built messages, its activations what
autograd keeps, and `fedlora-lab plan` answers in a table, in JSON, or with one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig

from fedlora_common.plans import LoraSpec, Mode, RunSpec
from fedlora_lab.cli import main
from fedlora_lab.plan import capacity, memory, meta_model, model_config
from fedlora_worker.modeling import SiteModel, load_model
from fedlora_worker.training import token_losses

ROOT = Path(__file__).resolve().parents[2]
ACTIVATIONS_WITHIN = 0.15
"""The activation formula against autograd's saved tensors on the CPU: 0.0% to 13.3% over, measured."""


@pytest.fixture(scope="module")
def comm() -> ModuleType:
    """bench/comm.py, the script whose measured bytes the planner must equal."""
    spec = importlib.util.spec_from_file_location("bench_comm", ROOT / "bench" / "comm.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_llama(path: Path, comm: ModuleType, config: LlamaConfig) -> Path:
    comm._tiny_tokenizer(config.vocab_size).save_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory, comm: ModuleType) -> Path:
    """bench/comm.py's small Llama, on disk with a tokenizer."""
    return save_llama(tmp_path_factory.mktemp("small-llama"), comm, comm.SMALL_LLAMA)


@pytest.fixture(scope="module")
def block_llama(tmp_path_factory: pytest.TempPathFactory, comm: ModuleType) -> Path:
    """Three blocks with grouped-query attention and an untied head, for the activation count."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    return save_llama(tmp_path_factory.mktemp("block-llama"), comm, config)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_planned_bytes_equal_what_bench_comm_counts_on_the_built_messages(
    comm: ModuleType, small_llama: Path, mode: Mode
) -> None:
    measured = comm.measured_row(small_llama, mode, comm.DEFAULT_CHUNK_BYTES)

    planned = capacity(str(small_llama), mode=mode, lora=comm.LORA)

    assert planned.trainable == measured.params
    assert planned.up_plain_bytes == measured.up_bytes
    assert planned.down_bytes == measured.down_bytes


def saved_bytes(
    path: Path, mode: Mode, lora: LoraSpec, *, tokens: int, checkpointing: bool, dtype: str | None = None
) -> int:
    """Bytes autograd keeps from a training forward of one row of `tokens` (bf16 autocast; the base in `dtype`,
    by default bf16 for (Q)LoRA), as the planner assumes a GPU runs it: parameters excluded, each storage once."""
    run = RunSpec(run_id="r", mode=mode, aggregation="fedavg", base_model="b", lora=lora, total_rounds=1, seed=0)
    dtype = dtype or ("float32" if mode == "full" else "bfloat16")
    model = load_model(run, SiteModel(path=str(path), dtype=dtype)).model
    if checkpointing:
        cast(Any, model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        token_losses(logits, ids)
    return sum(kept.values())


@pytest.mark.parametrize(
    ("mode", "dropout", "checkpointing"),
    [
        ("lora", 0.0, False),
        ("lora", 0.05, False),
        ("qlora", 0.05, False),
        ("qlora", 0.05, True),
        ("full", 0.0, False),
        ("full", 0.0, True),
    ],
)
def test_the_activation_formula_counts_what_autograd_keeps(
    block_llama: Path, mode: Mode, dropout: float, checkpointing: bool
) -> None:
    lora = LoraSpec(rank=8, dropout=dropout)
    name, config = model_config(str(block_llama))
    planned = memory(
        meta_model(name, config, mode, lora, "fedavg"),
        mode,
        lora,
        seq_len=512,
        micro_batch=1,
        dropout_mask_bytes=4,  # the CPU's dropout keeps a float32 mask
    )

    counted = saved_bytes(block_llama, mode, lora, tokens=512, checkpointing=checkpointing)

    estimate = planned.activations_checkpointed if checkpointing else planned.activations
    assert counted * (1 - ACTIVATIONS_WITHIN) <= estimate <= counted * (1 + ACTIVATIONS_WITHIN)


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_for_a_config_file_has_bytes_memory_and_secure_aggregation(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    args = ["--model", str(block_llama / "config.json"), "--mode", "qlora", "--rank", "4", "--seq-len", "256"]

    code, out, err = run_plan(capsys, *args, "--sites", "5", "--keystream-mbps", "1000", "--json")
    ffa_code, ffa_out, _ = run_plan(capsys, *args, "--aggregation", "ffa", "--json")

    assert (code, err) == (0, "")
    plan: dict[str, Any] = json.loads(out)
    ffa: dict[str, Any] = json.loads(ffa_out)
    per_block = 4 * (256 + 192 + 192 + 256 + 3 * 480)  # rank x (in + out) of q, k, v, o, gate, up, down
    assert plan["trainable"] == 3 * per_block
    assert plan["parameters"] == 3 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128) + 2 * 512 * 128 + 128
    assert plan["adapted_per_block"] == 7
    assert plan["adapted"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert plan["up_masked_bytes"] > plan["up_plain_bytes"] > 4 * plan["trainable"]
    assert plan["down_bytes"] > 4 * plan["trainable"]
    memory = plan["memory"]
    assert memory["peak_checkpointed"] < memory["peak"]
    assert memory["optimizer"] == 2 * memory["gradients"] == 8 * plan["trainable"]
    secure = plan["secure_aggregation"]
    masked_vector = 4 * (plan["trainable"] + 1)
    assert secure["masking_s"] == pytest.approx(5 * masked_vector / 1e9)
    assert secure["unmasking_per_dropout_s"] == pytest.approx(4 * masked_vector / 1e9)
    assert secure["threshold"] == 4
    assert ffa_code == 0
    assert ffa["trainable"] == 3 * 4 * (128 + 64 + 64 + 128 + 352 + 352 + 128)  # B alone: rank x out
    assert ffa["down_bytes"] == plan["down_bytes"]


def test_key_traffic_grows_with_the_sites(block_llama: Path) -> None:
    few = capacity(str(block_llama), sites=3).secure_aggregation
    many = capacity(str(block_llama), sites=12).secure_aggregation

    assert many.keys_up_bytes > few.keys_up_bytes > 0
    assert many.keys_down_bytes > 3 * few.keys_down_bytes


def test_plan_prints_the_table_for_a_published_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_plan(capsys, "--model", "meta-llama/Llama-3.2-3B", "--rank", "16", "--mode", "qlora")

    assert code == 0
    assert out.startswith("Llama-3.2-3B: LlamaForCausalLM, 28 layers, hidden 3072, MLP 8192, vocab 128256\n")
    assert "  parameters" in out
    assert "3,212,749,824" in out
    assert "24,313,856" in out  # bench/comm.py's rank-16 adapter of Llama-3.2-3B
    for line in ("up: update, masked (uint32)", "activations kept for the backward", "peak estimate", "masking"):
        assert line in out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model", "no/such-model"], "--model no/such-model: neither a model directory"),
        (["--model", "Llama-3.2-3B", "--targets", "c_attn"], "c_attn"),
        (["--model", "Llama-3.2-3B", "--sites", "1"], "--sites: secure aggregation needs at least 2 sites"),
        (["--model", "Llama-3.2-3B", "--mode", "full", "--aggregation", "ffa"], "--aggregation: ffa applies"),
    ],
)
def test_a_wrong_argument_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    code, out, err = run_plan(capsys, *args)

    assert code == 2
    assert out == ""
    assert err.startswith("fedlora-lab plan: error: ")
    assert named in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_the_gpu_smoke_script_runs_on_a_cpu_with_the_tiny_model(lab_cache: Path) -> None:
    smoke = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cache-dir", str(lab_cache), "--local-steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert smoke.returncode == 0, smoke.stderr[-3000:]
    rows = [line.split() for line in smoke.stdout.splitlines() if line.startswith(("clinical ", "legal "))]
    assert sorted((row[0], row[1]) for row in rows) == [
        ("clinical", "1"),
        ("clinical", "2"),
        ("legal", "1"),
        ("legal", "2"),
    ]
    assert all(float(row[2].replace(",", "")) > 0 and row[3] == "n/a" and float(row[4]) > 0 for row in rows)
    assert "2 rounds committed" in smoke.stdout


def test_a_mixture_of_experts_plan_names_its_fused_experts_and_refuses_dropout_as_the_worker_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = Qwen2MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        vocab_size=512,
    )
    config.save_pretrained(tmp_path)
    args = ["--model", str(tmp_path / "config.json"), "--rank", "4"]

    code, out, _ = run_plan(capsys, *args, "--dropout", "0", "--json")
    table_code, table, _ = run_plan(capsys, *args, "--dropout", "0")
    refused, _, err = run_plan(capsys, *args, "--dropout", "0.05")

    assert code == 0
    plan: dict[str, Any] = json.loads(out)
    assert plan["targets"] == ["all-linear"]
    assert "experts" in plan["adapted"]  # the routed experts, which peft's all-linear alone leaves out
    assert plan["adapted_per_block"] == 10  # q k v o, the shared expert's three and its gate, two fused experts
    modules = [name for name in plan["adapted"] if name != "experts"]
    named_code, named_out, _ = run_plan(capsys, *args, "--dropout", "0.05", "--targets", *modules, "--json")
    assert named_code == 0  # named modules adapt no experts, so dropout is the run's to choose
    assert json.loads(named_out)["trainable"] < plan["trainable"]
    assert table_code == 0
    assert f"on all-linear: {', '.join(plan['adapted'])} (10 modules a block)" in table
    assert refused == 2
    assert "set lora.dropout: 0" in err
