"""Any causal LM: one federation per family with the default targets (all-linear), on tiny random models.

Each family's model is built from its transformers config (hidden 64, 2 layers, the tiny test
vocabulary; no downloads) with the locally trained test tokenizer. A coordinator runs in process on
port 0 with two workers (threads, plain aggregation, one round); the committed adapter must load with
stock `PeftModel.from_pretrained`, change the logits, and the report must name the modules adapted.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import PeftModel
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora_common.plans import LoraSpec, RunSpec
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import WorkerSettings
from fedlora_worker.daemon import Worker, WorkerOutcome
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.modeling import LoadedModel, SiteMismatch, SiteModel, load_model
from fedlora_worker.transport import CoordinatorClient
from tests.client.conftest import tiny_run

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

LAYERS = 2
VOCAB = 512
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOOM_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[], transformers.PretrainedConfig]
    adapted: tuple[str, ...]
    """Every linear layer of a block and its fused experts, by last name: what all-linear must adapt."""
    per_layer: int
    """Adapted modules per block (GPT-2's c_proj is two: attention and MLP)."""


def _attention(**extra: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "num_hidden_layers": LAYERS, "num_attention_heads": 4, **SPECIAL, **extra}


FAMILIES = (
    Family(
        "llama",
        lambda: transformers.LlamaConfig(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        LLAMA_LIKE,
        7,
    ),
    Family(
        "qwen2",
        lambda: transformers.Qwen2Config(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        LLAMA_LIKE,
        7,
    ),
    Family(
        "mistral",
        lambda: transformers.MistralConfig(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        LLAMA_LIKE,
        7,
    ),
    Family(
        "gemma2",
        lambda: transformers.Gemma2Config(
            **_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16)
        ),
        LLAMA_LIKE,
        7,
    ),
    Family(
        "phi3",
        lambda: transformers.Phi3Config(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        4,
    ),
    Family(
        "gpt2",
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=128, **SPECIAL
        ),
        ("c_attn", "c_proj", "c_fc"),
        4,
    ),
    Family(
        "gpt_neox",
        lambda: transformers.GPTNeoXConfig(**_attention(hidden_size=64, intermediate_size=128)),
        BLOOM_LIKE,
        4,
    ),
    Family("falcon", lambda: transformers.FalconConfig(**_attention(hidden_size=64)), BLOOM_LIKE, 4),
    Family(
        "opt",
        lambda: transformers.OPTConfig(
            **_attention(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128)
        ),
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        6,
    ),
    Family(
        "starcoder2",
        lambda: transformers.Starcoder2Config(
            **_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
        6,
    ),
    Family(
        "olmo2",
        lambda: transformers.Olmo2Config(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        LLAMA_LIKE,
        7,
    ),
    Family(
        "granite",
        lambda: transformers.GraniteConfig(**_attention(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
        LLAMA_LIKE,
        7,
    ),
    # Mixtures of experts: the routed experts are fused 3-d parameters (gate_up_proj, down_proj), adapted as
    # parameters (two `experts` wrappers a block); Mixtral's and Qwen3-MoE's router (`gate`) is adapted too.
    Family(
        "mixtral",
        lambda: transformers.MixtralConfig(
            **_attention(hidden_size=64, intermediate_size=64, num_key_value_heads=2, num_local_experts=4)
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts"),
        7,
    ),
    Family(
        "qwen2_moe",
        lambda: transformers.Qwen2MoeConfig(
            **_attention(
                hidden_size=64,
                intermediate_size=128,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
            )
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate", "experts"),
        10,
    ),
    Family(
        "qwen3_moe",
        lambda: transformers.Qwen3MoeConfig(
            **_attention(
                hidden_size=64,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_key_value_heads=2,
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
            )
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts"),
        7,
    ),
    Family(
        "olmoe",
        lambda: transformers.OlmoeConfig(
            **_attention(
                hidden_size=64, intermediate_size=32, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2
            )
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts"),
        7,
    ),
)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
WORKERS = ("north", "south")


def make_family_model(family: Family, out: Path, tokenizer_from: Path) -> Path:
    """The family's model with random weights (seeded) and the test tokenizer, saved as a site would hold it."""
    out.mkdir(parents=True)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(family.config()).save_pretrained(out)
    return out


def run_federation(tmp_path: Path, base: Path, texts: list[str]) -> dict[str, Any]:
    """One round, two workers with the default LoRA targets, plain aggregation; the coordinator's report."""
    tokens = {worker: f"secret-{worker}" for worker in WORKERS}
    settings = RunSettings.model_validate(
        {
            "run_id": "families",
            "base_model": str(base),
            "rounds": 1,
            "min_workers": len(WORKERS),
            "workers": [{"id": w, "token_sha256": hashlib.sha256(t.encode()).hexdigest()} for w, t in tokens.items()],
            "secure_aggregation": {"enabled": False},
            "state_dir": tmp_path / "coordinator",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},  # target_modules: the default
            "training": {"local_steps": 3, "batch_size": 4, "max_seq_len": 32, "learning_rate": 1e-2},
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 20},
        }
    )
    errors: list[BaseException] = []
    outcomes: list[WorkerOutcome] = []
    loading = threading.Lock()

    def load_one_at_a_time(run: RunSpec, site: SiteModel) -> LoadedModel:
        with loading:  # each site is its own process in production; transformers' loading is not thread-safe
            return load_model(run, site)

    with CoordinatorServer(settings=settings) as server:

        def work(index: int, worker: str) -> None:
            train = tmp_path / f"{worker}.jsonl"
            train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[index::2]), encoding="utf-8")
            worker_settings = WorkerSettings.model_validate(
                {
                    "worker_id": worker,
                    "token": tokens[worker],
                    "coordinator": f"127.0.0.1:{server.port}",
                    "base_model": str(base),
                    "data": {"train": [train], "eval": [train]},
                    "progress": False,
                }
            )
            client = CoordinatorClient(
                target=worker_settings.coordinator, worker_id=worker, token=tokens[worker], retry=worker_settings.retry
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

        threads = [threading.Thread(target=work, args=(i, w), name=w) for i, w in enumerate(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        assert server.wait_finished()
        server.write_report()
    assert [o.finished for o in outcomes] == [True] * len(WORKERS)
    report: dict[str, Any] = json.loads((settings.state_dir / "report.json").read_text())
    return report


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=torch.arange(3, 35).unsqueeze(0)).logits
    return out


def test_every_family_federates_with_the_default_targets_and_its_adapter_loads_with_stock_peft(
    tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]
) -> None:
    texts = make_sentences(16, 40)
    for family in FAMILIES:
        # Prepare
        base = make_family_model(family, tmp_path / family.name / "base", tiny_base_model)

        # Execute
        report = run_federation(tmp_path / family.name, base, texts)

        # Assert: the run asked for all-linear, and the report names what that resolved to on this family.
        lora = report["lora"]
        assert lora["targets"] == ["all-linear"], family.name
        assert sorted(lora["adapted_modules"]) == sorted(family.adapted), family.name
        assert lora["adapted_count"] == LAYERS * family.per_layer, family.name
        summary = (tmp_path / family.name / "coordinator" / "report.md").read_text()
        assert f"adapted: {', '.join(lora['adapted_modules'])} ({LAYERS * family.per_layer} modules)" in summary
        plain = AutoModelForCausalLM.from_pretrained(base)
        adapter = tmp_path / family.name / "coordinator" / report["adapter_path"]
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        assert not torch.allclose(logits(plain), logits(tuned), atol=1e-5), family.name


@pytest.mark.parametrize("name", MOE)
def test_a_mixture_of_experts_with_lora_dropout_is_refused_in_one_line_saying_what_to_set(
    tmp_path: Path, tiny_base_model: Path, name: str
) -> None:
    (family,) = [f for f in FAMILIES if f.name == name]
    base = make_family_model(family, tmp_path / "base", tiny_base_model)
    run = tiny_run("lora", lora=LoraSpec(rank=4, alpha=8, dropout=0.05))

    with pytest.raises(SiteMismatch) as refused:
        load_model(run, SiteModel(path=str(base)))

    message = str(refused.value)
    assert message.startswith("lora.dropout: 0.05, but ")
    assert "(experts.gate_up_proj, experts.down_proj)" in message
    assert "set lora.dropout: 0 in run.yaml" in message
    assert "\n" not in message


def test_the_routed_experts_train_under_the_default_targets(tmp_path: Path, tiny_base_model: Path) -> None:
    (family,) = [f for f in FAMILIES if f.name == "qwen2_moe"]  # the family peft's all-linear alone leaves out
    base = make_family_model(family, tmp_path / "base", tiny_base_model)
    run = tiny_run("lora", lora=LoraSpec(rank=4, alpha=8, dropout=0.0))
    loaded = load_model(run, SiteModel(path=str(base)))

    ids = torch.arange(3, 35).unsqueeze(0)
    loaded.model(input_ids=ids, labels=ids).loss.backward()

    experts = {n: p for n, p in loaded.model.named_parameters() if ".mlp.experts." in n and ".lora_" in n}
    assert len(experts) == LAYERS * 2 * 2  # A and B of gate_up_proj and down_proj in every block
    assert all(p.requires_grad for p in experts.values())
    # B starts at zero, so A's first gradient is zero too: the loss reaches every expert's B
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in experts.items() if ".lora_B." in n)


def test_heterogeneous_rank_on_fused_experts_is_refused_in_one_line_naming_what_to_set(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    (family,) = [f for f in FAMILIES if f.name == "mixtral"]
    base = make_family_model(family, tmp_path / "base", tiny_base_model)
    run = tiny_run("lora", lora=LoraSpec(rank=4, alpha=8, dropout=0.0), aggregation="hetlora")

    with pytest.raises(SiteMismatch) as refused:
        load_model(run, SiteModel(path=str(base)))

    message = str(refused.value)
    assert message.startswith("aggregation: hetlora, but tensor ")
    assert "experts" in message
    assert message.endswith("use aggregation fedavg for this model")
    assert "\n" not in message
