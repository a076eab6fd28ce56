from __future__ import annotations

import random

from fedlora_worker.data import IGNORE_INDEX, TokenizedData
from fedlora_worker.packing import pack


def windows(lengths: list[int], *, prompt: int = 0) -> TokenizedData:
    """Windows of the given lengths with distinct tokens; the first `prompt` labels of each carry no loss."""
    ids, labels, token = [], [], 0
    for length in lengths:
        row = list(range(token, token + length))
        token += length
        ids.append(row)
        labels.append([IGNORE_INDEX] * min(prompt, length) + row[prompt:])
    return TokenizedData(input_ids=ids, labels=labels)


def targets(data: TokenizedData) -> list[int]:
    """The tokens training predicts: every label after a row's first that is not IGNORE_INDEX, in order."""
    return [label for row in data.labels for label in row[1:] if label != IGNORE_INDEX]


def test_windows_are_packed_whole_in_order_up_to_the_row_length() -> None:
    data = windows([5, 3, 4, 8, 2, 2])

    packed = pack(data, 8)

    assert [len(row) for row in packed.input_ids] == [8, 4, 8, 4]
    assert [t for row in packed.input_ids for t in row] == [t for row in data.input_ids for t in row]


def test_packing_predicts_exactly_the_tokens_predicted_unpacked() -> None:
    rng = random.Random(3)
    data = windows([rng.randint(2, 16) for _ in range(60)], prompt=2)

    packed = pack(data, 16)

    assert targets(packed) == targets(data)
    assert all(len(ids) == len(labels) <= 16 for ids, labels in zip(packed.input_ids, packed.labels, strict=True))


def test_a_full_row_is_only_closed_when_the_next_window_does_not_fit() -> None:
    rng = random.Random(4)
    data = windows([rng.randint(2, 10) for _ in range(40)])

    packed = pack(data, 12)

    starts = {row[0] for row in data.input_ids}
    for row, following in zip(packed.input_ids, packed.input_ids[1:], strict=False):
        first_window = next(r for r in data.input_ids if r[0] == following[0])
        assert following[0] in starts
        assert len(row) + len(first_window) > 12


def test_a_window_as_long_as_a_row_stays_alone() -> None:
    data = windows([3, 8, 3])

    packed = pack(data, 8)

    assert [len(row) for row in packed.input_ids] == [3, 8, 3]
