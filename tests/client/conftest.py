"""A tiny Llama and byte-level BPE tokenizer saved to disk, so tests load through the real from_pretrained."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedlora_common.plans import Aggregation, LoraSpec, Mode, RunSpec
from fedlora_worker.modeling import LoadedModel, SiteModel, load_model

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def tiny_run(mode: Mode, *, lora: LoraSpec, aggregation: Aggregation = "fedavg", seed: int = 0) -> RunSpec:
    """A run's fixed settings, as a coordinator would send them, for the tiny model."""
    return RunSpec(
        run_id="test-run",
        mode=mode,
        aggregation=aggregation,
        base_model="tiny-llama",
        lora=lora,
        total_rounds=1,
        seed=seed,
    )


def sentences(count: int, seed: int) -> list[str]:
    """Plain sentences over a few hundred made-up words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "dan", "qui", "po", "zet", "ar", "ny"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(count)]


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS.index("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def make_sentences() -> Callable[[int, int], list[str]]:
    """sentences(count, seed), for tests that need text the tiny tokenizer knows."""
    return sentences


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a 2-layer Llama (hidden 64, tied embeddings) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    _train_tokenizer(sentences(400, seed=0)).save_pretrained(path)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_run() -> Callable[..., RunSpec]:
    """tiny_run(mode, *, lora, aggregation="fedavg", seed=0): a RunSpec for the tiny model."""
    return tiny_run


@pytest.fixture(scope="session")
def load_tiny(tiny_base_model: Path) -> Callable[..., LoadedModel]:
    """load(mode, *, lora, dtype="float32", **tiny_run's keywords): the tiny model as a site loads it."""

    def load(mode: Mode, *, dtype: Any = "float32", **run: Any) -> LoadedModel:
        return load_model(tiny_run(mode, **run), SiteModel(path=str(tiny_base_model), dtype=dtype))

    return load


@pytest.fixture
def single_threaded_torch() -> Iterator[None]:
    """One intra-op thread for the test: tiny matmuls gain nothing from more, and on a shared
    2-core box OpenMP's spin-waiting threads made these tests 5-30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
