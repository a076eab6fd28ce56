from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedlora_worker.data import (
    IGNORE_INDEX,
    TokenizedData,
    batches,
    load_records,
    tokenize,
)

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture
def tokenizer(tiny_base_model: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_base_model)
    return loaded


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_json_csv_and_parquet_files_load_into_one_dataset(tmp_path: Path) -> None:
    records = [{"prompt": f"question {i}", "completion": f"answer {i}", "id": str(i)} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", records[:2])
    (tmp_path / "b.json").write_text(json.dumps(records[2:4]))
    datasets.Dataset.from_list(records[4:6]).to_csv(tmp_path / "c.csv", index=False)
    datasets.Dataset.from_list(records[6:]).to_parquet(tmp_path / "d.parquet")

    ds = load_records([tmp_path / name for name in ["a.jsonl", "b.json", "c.csv", "d.parquet"]])

    assert ds.column_names == ["prompt", "completion"]
    assert ds.cache_files == []  # held in memory: no copy of the records left on disk
    assert sorted(ds["completion"]) == sorted(r["completion"] for r in records)


def test_csv_text_column_that_looks_numeric_is_read_as_text(tmp_path: Path) -> None:
    (tmp_path / "numbers.csv").write_text("text\n1234\n5678\n")

    ds = load_records([tmp_path / "numbers.csv"])

    assert list(ds["text"]) == ["1234", "5678"]


def test_unknown_suffix_is_rejected_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "records.txt"
    path.write_text("hello")

    with pytest.raises(ValueError, match=r"records\.txt"):
        load_records([path])


def test_records_without_text_or_prompt_and_completion_are_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "only half"}])

    with pytest.raises(ValueError, match="'text' field or 'prompt' and 'completion'"):
        load_records([path])


def test_text_records_carry_loss_on_every_token_and_end_with_eos(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    ds = load_records([write_jsonl(tmp_path / "t.jsonl", [{"text": "kalo miren tusa."}])])

    data = tokenize(ds, tokenizer, max_seq_len=64)

    assert data.labels == data.input_ids
    assert data.input_ids[0][0] == tokenizer.bos_token_id
    assert data.input_ids[0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(data.input_ids[0], skip_special_tokens=True) == "kalo miren tusa."


def test_prompt_tokens_carry_no_loss_and_the_completion_does(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    record = {"prompt": "Patient kalo says:", "completion": " miren tusa."}
    ds = load_records([write_jsonl(tmp_path / "pc.jsonl", [record])])
    prompt_length = len(tokenizer.encode(record["prompt"]))

    data = tokenize(ds, tokenizer, max_seq_len=64)
    ids, labels = data.input_ids[0], data.labels[0]

    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert labels[prompt_length:] == ids[prompt_length:]
    assert tokenizer.decode(labels[prompt_length:], skip_special_tokens=True) == record["completion"]
    assert labels[-1] == tokenizer.eos_token_id


def test_chat_template_puts_the_loss_on_the_assistant_turn(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    ds = load_records([write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "kalo?", "completion": "miren."}])])

    data = tokenize(ds, tokenizer, max_seq_len=64)
    ids, labels = data.input_ids[0], data.labels[0]
    first_counted = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)

    assert tokenizer.decode(ids[:first_counted]) == "<s>user: kalo?</s><s>assistant: "
    assert tokenizer.decode(labels[first_counted:]) == "miren.</s>"
    assert labels.count(tokenizer.eos_token_id) == 1


def test_long_text_is_split_into_windows_that_keep_every_token(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    text = " ".join(make_sentences(20, 5))
    ds = load_records([write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "ka."}])])
    whole = [*tokenizer.encode(text), tokenizer.eos_token_id]

    data = tokenize(ds, tokenizer, max_seq_len=32)
    long_windows, short = data.input_ids[:-1], data.input_ids[-1]

    assert len(long_windows) > 3
    assert all(len(window) <= 32 for window in long_windows)
    # Consecutive windows overlap by one token: the first of each is context for its second.
    assert long_windows[0] + [t for window in long_windows[1:] for t in window[1:]] == whole
    assert short == [*tokenizer.encode("ka."), tokenizer.eos_token_id]


def test_windows_of_prompt_alone_are_left_out(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    record = {"prompt": " ".join(make_sentences(6, 6)), "completion": " kalo."}
    ds = load_records([write_jsonl(tmp_path / "p.jsonl", [record])])

    data = tokenize(ds, tokenizer, max_seq_len=16)

    predicted = [label for labels in data.labels for label in labels[1:] if label != IGNORE_INDEX]

    assert data.input_ids
    assert all(any(label != IGNORE_INDEX for label in labels[1:]) for labels in data.labels)
    assert tokenizer.decode(predicted) == " kalo.</s>"


def test_batches_are_right_padded_with_no_loss_or_attention_on_padding() -> None:
    data = TokenizedData(input_ids=[[5, 6, 7, 8], [9, 10]], labels=[[5, 6, 7, 8], [-100, 10]])

    batch = next(batches(data, batch_size=2, generator=torch.Generator().manual_seed(0), pad_id=0))
    short = int((batch.input_ids[:, 2:] == 0).all(dim=1).nonzero()[0])

    assert batch.input_ids.shape == (2, 4)
    assert batch.input_ids[short].tolist() == [9, 10, 0, 0]
    assert batch.attention_mask[short].tolist() == [1, 1, 0, 0]
    assert batch.labels[short].tolist() == [-100, 10, -100, -100]
    assert batch.attention_mask[1 - short].tolist() == [1, 1, 1, 1]


def test_batches_visit_every_window_once_per_epoch_in_a_seeded_order() -> None:
    data = TokenizedData(input_ids=[[i, i] for i in range(1, 11)], labels=[[i, i] for i in range(1, 11)])

    def first_ids(seed: int, count: int) -> list[int]:
        stream = batches(data, batch_size=4, generator=torch.Generator().manual_seed(seed), pad_id=0)
        return [i for _ in range(count) for i in next(stream).input_ids[:, 0].tolist()]

    torch.manual_seed(123)  # the global RNG plays no part
    two_epochs = first_ids(seed=1, count=5)

    assert Counter(two_epochs[:10]) == Counter(range(1, 11))
    assert Counter(two_epochs[10:]) == Counter(range(1, 11))
    assert first_ids(seed=1, count=5) == two_epochs
    assert first_ids(seed=2, count=5) != two_epochs


def test_batching_nothing_is_rejected() -> None:
    with pytest.raises(ValueError, match="no token windows"):
        batches(TokenizedData([], []), batch_size=2, generator=torch.Generator(), pad_id=0)
