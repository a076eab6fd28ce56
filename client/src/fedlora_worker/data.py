"""A site's records: read from files, tokenized with loss masks, and served as padded batches.

Records carry ``text`` (loss on every token), ``prompt`` + ``completion`` (loss on the completion
only) or ``messages`` (a chat rendered with the tokenizer's chat template, loss on the assistant
turns only); `fedlora_worker.datafiles` reads and checks the files. Raw text never leaves this
module except as token ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedlora_worker.datafiles import DataError, RecordFormat, read_records

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "TokenizedData",
    "batches",
    "collate",
    "load_records",
    "tokenize",
]

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt, padding); the value torch's cross entropy skips."""

_STRING = datasets.Value("string")
_FEATURES: dict[RecordFormat, datasets.Features] = {
    "text": datasets.Features({"text": _STRING}),
    "prompt_completion": datasets.Features({"prompt": _STRING, "completion": _STRING}),
    "messages": datasets.Features({"messages": datasets.List({"role": _STRING, "content": _STRING})}),
}


def load_records(paths: Sequence[Path]) -> datasets.Dataset:
    """Read and check jsonl/json, csv and parquet files into one in-memory dataset of the records' fields.

    A file that cannot be used raises `fedlora_worker.datafiles.DataError` (a ValueError) naming the
    file, the row and the fault. Nothing is written to the Hugging Face cache, so no second copy of
    sensitive records is left behind.
    """
    records = read_records(paths)
    return datasets.Dataset.from_list(records.rows, features=_FEATURES[records.format])


@dataclass(frozen=True)
class TokenizedData:
    """Token windows and their labels (IGNORE_INDEX where a token carries no loss)."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __post_init__(self) -> None:
        if [len(row) for row in self.input_ids] != [len(row) for row in self.labels]:
            raise ValueError("input_ids and labels must have the same shape")


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int) -> TokenizedData:
    """Tokenize records, end each with eos, and cut long ones into windows of at most max_seq_len.

    Without a chat template the completion directly follows the prompt (any separator belongs in the
    data); with one, prompt and completion become a user and an assistant turn. Chat records need a
    chat template. Consecutive windows overlap by one token, so every token after a record's first
    is predicted exactly once: nothing is dropped. Windows with nothing to predict (all prompt, or a
    single token) are left out.

    A record that cannot be tokenized is a `DataError` naming its position (from 1, through the data
    set's files in order) and the fault, never the text: what a chat template or tokenizer raises is said by its class, as it may quote
    the record.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if "messages" in ds.column_names and tokenizer.chat_template is None:
        raise ValueError(
            f"chat records ('messages') are rendered with the tokenizer's chat template, and the tokenizer of "
            f"{tokenizer.name_or_path} has none; give it one (chat_template.jinja) or use 'text' or 'prompt'/'completion'"
        )
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for number, record in enumerate(ds, start=1):
        for field, value in record.items():
            if value is None:
                raise DataError("is null", row=number, field=field)
        try:
            ids, record_labels = _encode(tokenizer, record)
        except DataError as exc:
            raise DataError(exc.fault, row=number, field=exc.field) from None
        except Exception as exc:  # the tokenizer's own; its message may quote the record
            raise DataError(
                f"cannot be tokenized by {tokenizer.name_or_path} ({type(exc).__name__})", row=number
            ) from None
        start = 0
        while True:
            window_labels = record_labels[start : start + max_seq_len]
            if any(label != IGNORE_INDEX for label in window_labels[1:]):
                input_ids.append(ids[start : start + max_seq_len])
                labels.append(window_labels)
            if start + max_seq_len >= len(ids):
                break
            start += max_seq_len - 1
    return TokenizedData(input_ids=input_ids, labels=labels)


def _encode(tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """One record's token ids and labels (IGNORE_INDEX where a token carries no loss)."""
    if "messages" in record:
        return _encode_chat(tokenizer, record["messages"])
    if "text" in record:
        ids = _with_eos(tokenizer.encode(record["text"], add_special_tokens=True), tokenizer)
        return ids, list(ids)
    if tokenizer.chat_template is not None:
        user = {"role": "user", "content": record["prompt"]}
        return _encode_chat(tokenizer, [user, {"role": "assistant", "content": record["completion"]}])
    prompt: list[int] = tokenizer.encode(record["prompt"], add_special_tokens=True)
    completion = _with_eos(tokenizer.encode(record["completion"], add_special_tokens=False), tokenizer)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """A conversation through the chat template, with loss on each assistant turn (and what closes it).

    Each assistant turn is found as the text the template adds between the conversation before it
    (with the generation prompt) and the conversation through it. The rendered text is split there
    and each piece tokenized alone: BPE merges across a boundary would shift it.
    """
    full = _render(tokenizer, messages, prompt=False)
    pieces: list[tuple[str, bool]] = []  # (text, carries loss)
    done = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], prompt=True)
        through = _render(tokenizer, messages[: turn + 1], prompt=False)
        if len(before) < done or not through.startswith(before) or not full.startswith(through):
            raise DataError(
                f"the chat template of {tokenizer.name_or_path} does not render its conversation as a prefix of "
                "the continuation, so its assistant turns cannot be found"
            )
        pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    ids: list[int] = []
    labels: list[int] = []
    last_counted = 0
    for text, counted in pieces:
        piece: list[int] = tokenizer.encode(text, add_special_tokens=False) if text else []  # the template has them
        if counted:
            last_counted = len(ids) + len(piece)
        ids += piece
        labels += piece if counted else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in labels:  # the template does not close the last turn with eos
        ids.insert(last_counted, eos)
        labels.insert(last_counted, eos)
    return ids, labels


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *, prompt: bool) -> str:
    """The conversation through the chat template; a refusal is a DataError in the template's own words.

    A template's message is shown only when the template holds it verbatim (``raise_exception('...')``
    with a literal): one built from the conversation (``'unknown role ' + message.role``) could quote
    the record, so it is named by its class alone.
    """
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=prompt, tokenize=False)
    except Exception as exc:  # jinja's TemplateError and whatever a template raises
        said = str(exc)
        reason = " ".join(said.split()) if said and said in str(tokenizer.chat_template) else type(exc).__name__
        raise DataError(f"the chat template of {tokenizer.name_or_path} refused a conversation: {reason}") from None
    return cast(str, text)


def _with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or ids[-1:] == [eos]:
        return ids
    return [*ids, eos]


@dataclass(frozen=True)
class Batch:
    """Right-padded rows: padding has attention 0 and label IGNORE_INDEX."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(data: TokenizedData, indices: Sequence[int], *, pad_id: int) -> Batch:
    """Stack the chosen windows, right-padded to the longest of them."""
    width = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        length = len(data.input_ids[i])
        input_ids[row, :length] = torch.tensor(data.input_ids[i])
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(data.labels[i])
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def batches(data: TokenizedData, *, batch_size: int, generator: torch.Generator, pad_id: int) -> Iterator[Batch]:
    """An endless stream of full batches: epoch after epoch, each a fresh permutation from generator.

    A batch may straddle two epochs, so every batch has batch_size rows and each window is seen once
    per epoch; the caller decides how many steps to take.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not data.input_ids:
        raise ValueError("no token windows to batch")
    return _stream(data, batch_size, generator, pad_id)


def _stream(data: TokenizedData, batch_size: int, generator: torch.Generator, pad_id: int) -> Iterator[Batch]:
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(torch.randperm(len(data.input_ids), generator=generator).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate(data, chosen, pad_id=pad_id)
