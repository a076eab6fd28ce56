"""A site's records: read from files, tokenized with loss masks, and served as padded batches.

Records carry either ``text`` (loss on every token) or ``prompt`` + ``completion`` (loss on the
completion only). Raw text never leaves this module except as token ids.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import datasets
import torch
from transformers import PreTrainedTokenizerBase

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

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(paths: Sequence[Path]) -> datasets.Dataset:
    """Read records from jsonl/json, csv and parquet files into one dataset of string columns.

    The files are parsed through a throw-away cache directory and kept in memory, so no second copy
    of sensitive records is left behind in the Hugging Face cache.
    """
    if not paths:
        raise ValueError("no data files given")
    by_builder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        builder = _BUILDERS.get(Path(path).suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unknown data file suffix; expected one of {sorted(_BUILDERS)}")
        by_builder[builder].append(str(path))
    parts = []
    with tempfile.TemporaryDirectory(prefix="fedlora-data-") as cache:
        for builder, files in by_builder.items():
            part = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, keep_in_memory=True)
            parts.append(_select_fields(part, files))
    return datasets.concatenate_datasets(parts)


def _select_fields(ds: datasets.Dataset, files: Sequence[str]) -> datasets.Dataset:
    columns = set(ds.column_names)
    if {"prompt", "completion"} <= columns:
        keep = ["prompt", "completion"]
    elif "text" in columns:
        keep = ["text"]
    else:
        raise ValueError(
            f"{', '.join(files)}: records need a 'text' field or 'prompt' and 'completion'; found {sorted(columns)}"
        )
    strings = datasets.Features({name: datasets.Value("string") for name in keep})
    return ds.select_columns(keep).cast(strings)


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
    data); with one, prompt and completion become a user and an assistant turn. Consecutive windows
    overlap by one token, so every token after a record's first is predicted exactly once: nothing
    is dropped. Windows with nothing to predict (all prompt, or a single token) are left out.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for index, record in enumerate(ds):
        for field, value in record.items():
            if value is None:
                raise ValueError(f"record {index}: field {field!r} is empty")
        if "text" in record:
            ids = _with_eos(tokenizer.encode(record["text"], add_special_tokens=True), tokenizer)
            record_labels = list(ids)
        else:
            prompt, completion = _encode_pair(tokenizer, record["prompt"], record["completion"])
            ids = prompt + completion
            record_labels = [IGNORE_INDEX] * len(prompt) + completion
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


def _encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids (eos included), which concatenated give the training sequence."""
    if tokenizer.chat_template is None:
        prompt_ids: list[int] = tokenizer.encode(prompt, add_special_tokens=True)
        return prompt_ids, _with_eos(tokenizer.encode(completion, add_special_tokens=False), tokenizer)
    user = {"role": "user", "content": prompt}
    assistant = {"role": "assistant", "content": completion}
    # Split the rendered text, not the token ids: BPE merges across the boundary would shift it.
    prompt_text = cast(str, tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False))
    full_text = cast(str, tokenizer.apply_chat_template([user, assistant], tokenize=False))
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)  # the template has them
    completion_ids: list[int] = tokenizer.encode(full_text[len(prompt_text) :], add_special_tokens=False)
    if tokenizer.eos_token_id in completion_ids:  # the template already closes the turn
        return prompt_ids, completion_ids
    return prompt_ids, _with_eos(completion_ids, tokenizer)


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
