"""Packing: whole short windows share one training row instead of each being padded alone."""

from __future__ import annotations

from fedlora_worker.data import IGNORE_INDEX, TokenizedData

__all__ = ["pack"]


def pack(data: TokenizedData, max_seq_len: int) -> TokenizedData:
    """Concatenate windows, in order, into rows of at most max_seq_len tokens, never splitting one.

    A window that does not fit in the current row starts the next (a full-length window, a piece of
    a long record, has a row to itself). In a row, the first label of every window but the first
    becomes IGNORE_INDEX: that token would be predicted from the window before it, which unpacked
    training never does; so exactly the tokens counted unpacked are counted packed. Each record ends
    with eos (``data.tokenize``), and attention spans the records of a row, as in pre-training.
    """
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    row_ids: list[int] = []
    row_labels: list[int] = []
    for ids, window_labels in zip(data.input_ids, data.labels, strict=True):
        if row_ids and len(row_ids) + len(ids) > max_seq_len:
            input_ids.append(row_ids)
            labels.append(row_labels)
            row_ids, row_labels = [], []
        row_labels.extend([IGNORE_INDEX] if row_ids else window_labels[:1])
        row_labels.extend(window_labels[1:])
        row_ids.extend(ids)
    if row_ids:
        input_ids.append(row_ids)
        labels.append(row_labels)
    return TokenizedData(input_ids=input_ids, labels=labels)
