"""A site's record files, read and checked row by row before anything else starts.

Three record shapes, one per data set (all files of `data.train`, or of `data.eval`, share it):

- ``text``: a string; loss on every token.
- ``prompt`` + ``completion``: strings; loss on the completion only.
- ``messages``: a chat, a list of ``{"role": ..., "content": ...}`` turns with at least one
  ``assistant`` turn; rendered with the tokenizer's chat template, loss on assistant turns only.

Files: ``.jsonl`` (one JSON object per line), ``.json`` (a JSON array of objects, or JSON lines),
``.csv`` (a header row; every value is text, so no ``messages``) and ``.parquet``. Other fields are
ignored. Any fault (missing or empty file, not UTF-8, not parseable, a field missing, null, empty or
of the wrong type) is a `DataError` whose message is one line naming the file, the row and the
fault. Rows count from 1: the line of a jsonl file, the element of a json array, the record after
the header of a csv file, the row of a parquet file.

Plain Python (pyarrow only for parquet): `fedlora-worker check-config` reads the files without
loading torch or datasets. Record text never appears in an error message.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["FORMAT_FIELDS", "SUFFIXES", "DataError", "RecordFormat", "RecordSet", "read_records"]

RecordFormat = Literal["text", "prompt_completion", "messages"]

FORMAT_FIELDS: dict[RecordFormat, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
"""The fields each record shape keeps, in order."""

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A record file that cannot be used; the message is one line naming the file, the row and the fault."""


@dataclass(frozen=True)
class RecordSet:
    """The records of one data set, each holding only its shape's fields (FORMAT_FIELDS)."""

    format: RecordFormat
    rows: list[dict[str, Any]]
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.rows)


def read_records(paths: Sequence[Path]) -> RecordSet:
    """Read and check every file; one shape for all of them. Raises DataError on the first fault."""
    if not paths:
        raise DataError("no data files given")
    found: RecordFormat | None = None
    first = Path(paths[0])
    rows: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw)
        shape, records = _read_file(path)
        if found is not None and shape != found:
            raise DataError(
                f"{path}: records are {_describe(shape)} but {first} holds {_describe(found)}; "
                "the files of one data set share one shape"
            )
        found = shape
        rows.extend(records)
    assert found is not None
    return RecordSet(format=found, rows=rows, files=tuple(Path(p) for p in paths))


def _describe(shape: RecordFormat) -> str:
    return {"text": "'text'", "prompt_completion": "'prompt'/'completion'", "messages": "chat 'messages'"}[shape]


def _read_file(path: Path) -> tuple[RecordFormat, list[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown suffix {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: empty file (no records)")
    if suffix == ".parquet":
        rows: Iterator[tuple[int, Any]] = _parquet_rows(path, data)
    else:
        text = _utf8(path, data, header=suffix == ".csv")
        rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text, lines=suffix == ".jsonl")
    shape: RecordFormat | None = None
    records = []
    for number, row in rows:
        where = f"{path} row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: not an object with named fields but {_kind(row)}")
        if shape is None:
            shape = _shape(where, row)
        records.append(_record(where, shape, row))
    if shape is None:
        raise DataError(f"{path}: no records")
    return shape, records


def _utf8(path: Path, data: bytes, *, header: bool) -> str:
    """The file's text; a byte that is not UTF-8 is named with its row (for csv: after the header line)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        where = ("header" if line == 1 else f"row {line - 1}") if header else f"row {line}"
        raise DataError(
            f"{path} {where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "re-encode the file as UTF-8"
        ) from None


def _json_rows(path: Path, text: str, *, lines: bool) -> Iterator[tuple[int, Any]]:
    if not lines:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": several values, i.e. JSON lines in a .json file
                raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        else:
            if not isinstance(whole, list):
                raise DataError(
                    f"{path}: expected a JSON array of records (or one object per line), got {_kind(whole)}"
                )
            yield from enumerate(whole, start=1)
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    number = 0
    try:
        for number, row in enumerate(reader, start=1):
            # A short row leaves its last fields None: they are missing (csv has no null).
            yield number, {key: value for key, value in row.items() if key is not None and value is not None}
    except csv.Error as exc:
        raise DataError(f"{path} row {number + 1}: not valid CSV ({exc})") from None


def _parquet_rows(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable parquet file ({first})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _shape(where: str, row: dict[str, Any]) -> RecordFormat:
    """The record shape a file holds, read from its first record."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    found = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(f"{where}: no 'text', 'prompt'/'completion' or 'messages' field (fields: {found})")


def _record(where: str, shape: RecordFormat, row: dict[str, Any]) -> dict[str, Any]:
    if shape == "messages":
        return {"messages": _messages(where, row)}
    return {name: _string(where, row, name) for name in FORMAT_FIELDS[shape]}


def _string(where: str, row: dict[str, Any], name: str, label: str | None = None) -> str:
    label = label or f"field {name!r}"
    if name not in row:
        raise DataError(f"{where}: {label} is missing")
    value = row[name]
    if value is None:
        raise DataError(f"{where}: {label} is null")
    if not isinstance(value, str):
        raise DataError(f"{where}: {label} is {_kind(value)}, not a string")
    if not value.strip():
        raise DataError(f"{where}: {label} is empty")
    return value


def _messages(where: str, row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in row:
        raise DataError(f"{where}: field 'messages' is missing")
    turns = row["messages"]
    if turns is None:
        raise DataError(f"{where}: field 'messages' is null")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'messages' is {_kind(turns)}, not a list of turns")
    if not turns:
        raise DataError(f"{where}: field 'messages' is empty")
    out = []
    for index, turn in enumerate(turns):
        label = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {label} is {_kind(turn)}, not an object with 'role' and 'content'")
        role = _string(where, turn, "role", f"{label}.role")
        content = turn.get("content")
        if role == "assistant" or content is None or not isinstance(content, str):
            content = _string(where, turn, "content", f"{label}.content")  # names the fault
        out.append({"role": role, "content": content})
    if not any(turn["role"] == "assistant" for turn in out):
        raise DataError(f"{where}: 'messages' has no assistant turn (nothing to learn)")
    return out


def _kind(value: Any) -> str:
    """A value's type in the words of JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
