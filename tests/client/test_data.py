from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from fedlora_worker.datafiles import DataError, read_records

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture
def tokenizer(tiny_base_model: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_base_model)
    return loaded


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
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


CHAT = [
    {"role": "system", "content": "kalo"},
    {"role": "user", "content": "miren?"},
    {"role": "assistant", "content": "tusa."},
    {"role": "user", "content": "ka?"},
    {"role": "assistant", "content": "lo."},
]


def test_chat_records_load_from_jsonl_json_and_parquet_alike(tmp_path: Path) -> None:
    records = [{"messages": CHAT, "id": "1"}, {"messages": CHAT[1:3]}]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "c.parquet")

    loaded = [load_records([tmp_path / name]) for name in ["a.jsonl", "b.json", "c.parquet"]]

    assert all(ds.column_names == ["messages"] for ds in loaded)
    assert all(list(ds["messages"]) == [CHAT, CHAT[1:3]] for ds in loaded)


def test_json_lines_in_a_json_file_are_read_as_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"text": "ka"}, {"text": "lo"}])

    assert list(load_records([path])["text"]) == ["ka", "lo"]


def _parquet(path: Path, columns: dict[str, list[Any]]) -> bytes:
    datasets.Dataset.from_dict(columns).to_parquet(path)
    return path.read_bytes()


BAD_FILES: list[tuple[str, bytes | None, str]] = [
    ("empty.jsonl", b"", "empty.jsonl: empty file (no records)"),
    ("blank.jsonl", b"\n \n", "blank.jsonl: empty file (no records)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin1.jsonl row 2: not UTF-8 text (at byte 14 of"),
    ("null.jsonl", b'{"text": "ok"}\n{"text": null}\n', "null.jsonl row 2: field 'text' is null"),
    ("blank-text.jsonl", b'{"text": "ok"}\n{"text": "  "}\n', "blank-text.jsonl row 2: field 'text' is empty"),
    ("number.jsonl", b'{"text": 42}\n', "number.jsonl row 1: field 'text' is a number, not a string"),
    ("missing.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "missing.jsonl row 2: field 'text' is missing"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "broken.jsonl row 2: not valid JSON (Expecting value"),
    ("list.jsonl", b'["a", "b"]\n', "list.jsonl row 1: not an object with named fields but a list"),
    (
        "other.jsonl",
        b'{"body": "x", "id": 1}\n',
        "other.jsonl row 1: no 'text', 'prompt'/'completion' or 'messages' field (it has 2 other fields, not named",
    ),
    ("half.jsonl", b'{"prompt": "only half"}\n', "half.jsonl row 1: field 'completion' is missing"),
    ("chat-str.jsonl", b'{"messages": "hi"}\n', "chat-str.jsonl row 1: field 'messages' is a string, not a list"),
    (
        "chat-user.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        "chat-user.jsonl row 1: field 'messages' has no assistant turn (nothing to learn)",
    ),
    (
        "chat-null.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}\n',
        "chat-null.jsonl row 1: messages[1].content is null",
    ),
    (
        "chat-role.jsonl",
        b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
        "chat-role.jsonl row 1: messages[0].role is missing",
    ),
    ("short.csv", b"prompt,completion\nq,a\nq2\n", "short.csv row 2: field 'completion' is missing"),
    ("blank.csv", b'text\nka\n""\n', "blank.csv row 2: field 'text' is empty"),
    ("header.csv", b"text\n", "header.csv: no records"),
    ("latin1.csv", b"text\ncaf\xe9\n", "latin1.csv row 1: not UTF-8 text (at byte 4 of the line)"),
    ("object.json", b'{"text": "a", "more": "b"}', "object.json: expected a JSON array of records"),
    ("bad.parquet", b"not parquet at all", "bad.parquet: not a readable parquet file"),
    ("records.txt", b"hello", "records.txt: unknown suffix '.txt'; expected one of .jsonl, .json, .csv, .parquet"),
    ("absent.jsonl", None, "absent.jsonl: no such file"),
]


@pytest.mark.parametrize(("name", "content", "fault"), BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_an_unusable_file_is_refused_in_one_line_naming_the_file_the_row_and_the_fault(
    tmp_path: Path, name: str, content: bytes | None, fault: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(DataError) as refused:
        load_records([path])

    assert str(refused.value).startswith(str(tmp_path))
    assert fault in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("columns", "fault"),
    [
        ({"text": [1, 2]}, "row 1: field 'text' is a number, not a string"),
        ({"text": ["ka", None]}, "row 2: field 'text' is null"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_or_with_nulls_is_refused_by_row(
    tmp_path: Path, columns: dict[str, list[Any]], fault: str
) -> None:
    path = tmp_path / "records.parquet"
    _parquet(path, columns)

    with pytest.raises(DataError, match=re.escape(f"{path} {fault}")):
        load_records([path])


def test_a_directory_is_refused_as_a_data_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").mkdir()

    with pytest.raises(DataError, match=r"train\.jsonl: is a directory"):
        load_records([tmp_path / "train.jsonl"])


def test_files_of_one_data_set_share_one_record_shape(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "ka"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])

    with pytest.raises(DataError, match=r"chat\.jsonl: records are chat 'messages' but .*text\.jsonl holds 'text'"):
        read_records([text, chat])


def test_an_empty_system_turn_is_accepted_but_an_empty_assistant_turn_is_not(tmp_path: Path) -> None:
    system = [{"role": "system", "content": ""}, *CHAT[1:3]]
    silent = [*CHAT[1:2], {"role": "assistant", "content": ""}]

    accepted = read_records([write_jsonl(tmp_path / "ok.jsonl", [{"messages": system}])])

    assert accepted.rows == [{"messages": system}]
    with pytest.raises(DataError, match=r"row 1: messages\[1\]\.content is empty"):
        read_records([write_jsonl(tmp_path / "bad.jsonl", [{"messages": silent}])])


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


def test_chat_records_carry_loss_on_every_assistant_turn_and_nothing_else(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    ds = load_records([write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])])

    data = tokenize(ds, tokenizer, max_seq_len=128)
    ids, labels = data.input_ids[0], data.labels[0]
    counted = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    turns = [[counted[0]]]
    for i in counted[1:]:
        if i == turns[-1][-1] + 1:
            turns[-1].append(i)
        else:
            turns.append([i])

    rendered = "".join(f"<s>{m['role']}: {m['content']}</s>" for m in CHAT)
    assert tokenizer.decode(ids) == rendered
    assert [tokenizer.decode([ids[i] for i in turn]) for turn in turns] == ["tusa.</s>", "lo.</s>"]
    assert all(labels[i] == ids[i] for i in counted)


def test_chat_records_without_a_chat_template_are_refused_in_one_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    ds = load_records([write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])])

    with pytest.raises(ValueError, match=r"chat template, and the tokenizer of .* has none") as refused:
        tokenize(ds, tokenizer, max_seq_len=64)

    assert "\n" not in str(refused.value)


def test_a_chat_template_that_refuses_a_conversation_is_named_in_one_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    )
    ds = load_records([write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])])

    with pytest.raises(DataError, match=r"^record 1: the chat template of .* refused a conversation: no system role$"):
        tokenize(ds, tokenizer, max_seq_len=64)


def test_a_chat_template_refusal_that_quotes_the_conversation_is_named_by_its_class_alone(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ raise_exception('user turn ' + m['content'] + ' refused') }}{% endif %}{% endfor %}"
    )
    ds = load_records([write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])])

    with pytest.raises(DataError) as refused:
        tokenize(ds, tokenizer, max_seq_len=64)

    assert str(refused.value) == (
        f"record 1: the chat template of {tokenizer.name_or_path} refused a conversation: TemplateError"
    )


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
