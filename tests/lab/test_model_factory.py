"""The lab base model: a loadable directory, a useful loss, a cache that is reused, and a tokenizer."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora_lab.datagen import DOMAINS, pretraining_corpus
from fedlora_lab.model_factory import LAB_MODEL_FILE, LAB_SIZES, LabModelConfig, MadeModel, cached_model, make_model
from fedlora_lab.tokenizer import train_tokenizer

TINY = LabModelConfig.tiny()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and the suite may share the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(cache: Path) -> MadeModel:
    return cached_model(cache, TINY)


def test_make_model_directory_loads_with_auto_classes(built: MadeModel) -> None:
    model = AutoModelForCausalLM.from_pretrained(built.path)
    tokenizer = AutoTokenizer.from_pretrained(built.path)

    ids = tokenizer("Patient: Jane Doe  MRN: MRN-1234-5678", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == TINY.num_layers
    assert tokenizer.model_max_length == TINY.max_seq_len


def test_make_model_heldout_loss_is_below_uniform(built: MadeModel) -> None:
    assert set(built.heldout_by_domain) == set(DOMAINS)
    assert all(0 < loss < built.uniform_loss for loss in built.heldout_by_domain.values())
    assert built.pretrain_loss < built.uniform_loss
    assert built.uniform_loss == pytest.approx(torch.log(torch.tensor(float(TINY.vocab_size))).item())


def test_make_model_records_config_fingerprint_and_losses(built: MadeModel) -> None:
    record = json.loads((built.path / LAB_MODEL_FILE).read_text(encoding="utf-8"))

    assert record["fingerprint"] == TINY.fingerprint()
    assert record["config"] == dataclasses.asdict(TINY)
    assert record["heldout_loss"] == pytest.approx(built.heldout_loss)
    assert record["pretrain_loss"] == pytest.approx(built.pretrain_loss)


def test_cached_model_reuses_a_complete_model(cache: Path, built: MadeModel) -> None:
    weights = built.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = cached_model(cache, TINY)

    assert not built.reused
    assert again.reused
    assert again.path == built.path == cache / TINY.fingerprint()
    assert again.heldout_loss == pytest.approx(built.heldout_loss)
    assert weights.stat().st_mtime_ns == mtime


def test_make_model_is_deterministic_and_reports_progress(built: MadeModel, tmp_path: Path) -> None:
    steps: list[tuple[int, int, float]] = []

    made = make_model(tmp_path / "model", TINY, progress=lambda s, n, loss: steps.append((s, n, loss)))

    assert [(s, n) for s, n, _ in steps] == [(s, TINY.pretrain_steps) for s in range(1, TINY.pretrain_steps + 1)]
    ours, theirs = load_file(made.path / "model.safetensors"), load_file(built.path / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_cached_model_rebuilds_an_incomplete_entry(tmp_path: Path) -> None:
    broken = tmp_path / TINY.fingerprint()
    broken.mkdir()
    (broken / "config.json").write_text("{}", encoding="utf-8")

    made = cached_model(tmp_path, TINY)

    assert not made.reused
    assert (broken / LAB_MODEL_FILE).is_file()
    assert AutoTokenizer.from_pretrained(broken).bos_token == "<s>"


def test_make_model_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(FileExistsError, match="out_dir"):
        make_model(tmp_path, TINY)

    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_fingerprint_is_stable_and_follows_every_field() -> None:
    other: dict[str, Any] = {
        "vocab_size": 600,
        "hidden_size": 96,
        "intermediate_size": 200,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 1,
        "max_seq_len": 64,
        "pretrain_docs": 151,
        "pretrain_steps": 41,
        "batch_size": 9,
        "learning_rate": 1e-3,
        "eval_docs": 5,
        "seed": 1,
    }

    keys = {dataclasses.replace(TINY, **{name: value}).fingerprint() for name, value in other.items()}

    assert set(other) == {f.name for f in dataclasses.fields(TINY)}
    assert TINY.fingerprint() == LabModelConfig.tiny().fingerprint()
    assert len(keys | {TINY.fingerprint()}) == len(other) + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("num_heads", 3),
        ("num_kv_heads", 3),
        ("learning_rate", 0.0),
        ("seed", -1),
        ("batch_size", 2.0),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        LabModelConfig(**{field: value})  # type: ignore[arg-type]


def test_tokenizer_round_trips_through_save_and_auto_tokenizer(tmp_path: Path) -> None:
    texts = pretraining_corpus(60, seed=1)
    sample = "Account number: ACCT-4821-7730, DOB 1967-03-14, café ✓"
    tokenizer = train_tokenizer(texts, vocab_size=600)

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    ids = loaded(sample)["input_ids"]
    assert ids == tokenizer(sample)["input_ids"]
    assert ids[0] == loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == sample
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(loaded) <= 600


def test_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes() -> None:
    with pytest.raises(ValueError, match=r"^vocab_size:"):
        train_tokenizer(["text"], vocab_size=100)


def test_each_named_size_is_its_own_model_and_small_is_narrower_than_default() -> None:
    configs = {size: LabModelConfig.named(size) for size in LAB_SIZES}

    assert configs["default"] == LabModelConfig()
    assert configs["tiny"] == LabModelConfig.tiny()
    assert len({c.fingerprint() for c in configs.values()}) == len(LAB_SIZES)
    assert configs["small"].hidden_size < configs["default"].hidden_size
    assert configs["small"].num_layers == configs["default"].num_layers
