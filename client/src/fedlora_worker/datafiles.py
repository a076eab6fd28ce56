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
the header of a csv file, the row of a parquet file. Canary files (`read_canaries`) are JSON lines,
checked the same way.

Record text never appears in an error message, nor does a field name this module does not expect
(a csv file without a header row has record text for field names): `DataError` composes its line
from a place, a field this module names and a fault in this module's words, and every parser's
exception is rephrased by its class, because libraries quote the value they choke on.

Plain Python (pyarrow only for parquet): `fedlora-worker check-config` reads the files without
loading torch or datasets.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from fedlora_worker.records import CanaryRecord, Group

__all__ = [
    "FORMAT_FIELDS",
    "SUFFIXES",
    "DataError",
    "RecordFormat",
    "RecordSet",
    "read_canaries",
    "read_records",
]

RecordFormat = Literal["text", "prompt_completion", "messages"]

FORMAT_FIELDS: dict[RecordFormat, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
"""The fields each record shape keeps, in order."""

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

_KNOWN_FIELDS = frozenset(name for names in FORMAT_FIELDS.values() for name in names)

_JSON_FAULTS = frozenset(
    {
        "Expecting value",
        "Expecting property name enclosed in double quotes",
        "Expecting ':' delimiter",
        "Expecting ',' delimiter",
        "Invalid control character at",
        "Invalid \\escape",
        "Invalid \\uXXXX escape",
        "Unterminated string starting at",
        "Extra data",
        "Illegal trailing comma before end of object",
        "Illegal trailing comma before end of array",
    }
)
"""The json module's own phrases, which quote nothing of the text; any other message is not shown."""

_CSV_FAULTS = {
    "field larger than field limit": "a field longer than 131072 characters, the csv module's limit",
    "new-line character seen in unquoted field": "a line break inside an unquoted field",
}
"""The csv module's messages by their opening words; some others quote the characters of the file."""


class DataError(ValueError):
    """A record (or record file) that cannot be used: one line naming where and what, never a value.

    The line is composed here from its parts, so a message from a library, which often quotes the
    value it chokes on, cannot slip into it: `file` and `row` (or, without a file, the record's
    position in its data set), `field` a name this module expects or a position (``messages[1].role``),
    `fault` a phrase of this module, and `setting` the setting that named the file (``data.train``).
    """

    def __init__(
        self,
        fault: str,
        file: Path | None = None,
        row: int | None = None,
        field: str | None = None,
        setting: str | None = None,
    ) -> None:
        self.fault = fault
        self.file = file
        self.row = row
        self.field = field
        self.setting = setting
        super().__init__(self._line())

    def _line(self) -> str:
        parts = [self.setting] if self.setting else []
        if self.file is not None:
            parts.append(str(self.file) if self.row is None else f"{self.file} row {self.row}")
        elif self.row is not None:
            parts.append(f"record {self.row}")
        if self.field is None:
            parts.append(self.fault)
        else:
            label = self.field if "[" in self.field or "." in self.field else f"field {self.field!r}"
            parts.append(f"{label} {self.fault}")
        return ": ".join(parts)

    def within(self, setting: str) -> DataError:
        """The same fault, said of the setting that names its files."""
        return DataError(self.fault, self.file, self.row, self.field, setting)


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
                f"records are {_describe(shape)} but {first} holds {_describe(found)}; "
                "the files of one data set share one shape",
                path,
            )
        found = shape
        rows.extend(records)
    assert found is not None
    return RecordSet(format=found, rows=rows, files=tuple(Path(p) for p in paths))


def read_canaries(paths: Sequence[Path]) -> list[CanaryRecord]:
    """Canary and control records from JSON lines files, in order; DataError on the first fault."""
    records = []
    for path in map(Path, paths):
        for number, row in _json_rows(path, _utf8(path, _read(path), header=False), lines=True):
            records.append(_canary(path, number, row))
    return records


def _describe(shape: RecordFormat) -> str:
    return {"text": "'text'", "prompt_completion": "'prompt'/'completion'", "messages": "chat 'messages'"}[shape]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path) from None


def _read_file(path: Path) -> tuple[RecordFormat, list[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unknown suffix {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}", path)
    data = _read(path)
    if not data.strip():
        raise DataError("empty file (no records)", path)
    if suffix == ".parquet":
        rows: Iterator[tuple[int, Any]] = _parquet_rows(path, data)
    else:
        text = _utf8(path, data, header=suffix == ".csv")
        rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text, lines=suffix == ".jsonl")
    shape: RecordFormat | None = None
    records = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"not an object with named fields but {_kind(row)}", path, number)
        if shape is None:
            shape = _shape(path, number, row, columns=suffix in (".csv", ".parquet"))
        records.append(_record(path, number, shape, row))
    if shape is None:
        raise DataError("no records", path)
    return shape, records


def _utf8(path: Path, data: bytes, *, header: bool) -> str:
    """The file's text; a byte that is not UTF-8 is named by its row and offset (for csv: after the header line)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        fault = f"not UTF-8 text (at byte {column} of the line); re-encode the file as UTF-8"
        if header and line == 1:
            raise DataError(f"the header row is {fault}", path) from None
        raise DataError(fault, path, line - 1 if header else line) from None


def _json_rows(path: Path, text: str, *, lines: bool) -> Iterator[tuple[int, Any]]:
    if not lines:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": several values, i.e. JSON lines in a .json file
                raise DataError(_json_fault(exc, f"at line {exc.lineno} column {exc.colno}"), path) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(_json_fault(exc, "in the file"), path) from None
        else:
            if not isinstance(whole, list):
                raise DataError(f"expected a JSON array of records (or one object per line), got {_kind(whole)}", path)
            yield from enumerate(whole, start=1)
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(_json_fault(exc, f"at column {exc.colno}"), path, number) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(_json_fault(exc, "in the line"), path, number) from None


def _json_fault(exc: ValueError | RecursionError, where: str) -> str:
    """What the json module refused, in its own words only where they quote nothing."""
    if isinstance(exc, RecursionError):
        return f"not valid JSON (nested too deeply {where})"
    if isinstance(exc, json.JSONDecodeError) and exc.msg in _JSON_FAULTS:
        return f"not valid JSON ({exc.msg.removesuffix(' at')} {where})"  # "starting at" + "at column 3"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({where})"
    return f"not valid JSON (a number too long to read {where})"  # int(): over sys.get_int_max_str_digits()


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    number = 0
    try:
        for number, row in enumerate(reader, start=1):
            # A short row leaves its last fields None: they are missing (csv has no null).
            yield number, {key: value for key, value in row.items() if key is not None and value is not None}
    except csv.Error as exc:
        fault = next((said for opening, said in _CSV_FAULTS.items() if str(exc).startswith(opening)), None)
        raise DataError(f"not valid CSV ({fault})" if fault else "not valid CSV", path, number + 1) from None


def _parquet_rows(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        rows = pq.read_table(pa.BufferReader(data), use_threads=False).to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataError(f"not a readable parquet file ({type(exc).__name__})", path) from None
    yield from enumerate(rows, start=1)


def _shape(path: Path, number: int, row: dict[str, Any], *, columns: bool) -> RecordFormat:
    """The record shape a file holds, read from its first record."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    kind = "column" if columns else "field"
    fault = f"no 'text', 'prompt'/'completion' or 'messages' {kind} ({_unexpected(row, kind)})"
    if path.suffix.lower() == ".csv":  # the fields are the header's: the fault is the header's
        raise DataError(f"the header row names {fault}; a csv file starts with a header row", path)
    raise DataError(fault, path, number)


def _unexpected(row: dict[str, Any], kind: str) -> str:
    """How many fields a record has and where, never their names: those may be record text."""
    if not row:
        return f"it has no {kind}s"
    said = f"it has {len(row)} other {kind}{'s' if len(row) > 1 else ''}, not named here"
    near = [
        f"{kind} {position} is {str(key).strip().lower()!r} in other case or spacing"
        for position, key in enumerate(row, start=1)
        if str(key).strip().lower() in _KNOWN_FIELDS
    ]
    return "; ".join([said, *near])


def _record(path: Path, number: int, shape: RecordFormat, row: dict[str, Any]) -> dict[str, Any]:
    if shape == "messages":
        return {"messages": _messages(path, number, row)}
    return {name: _string(path, number, row, name) for name in FORMAT_FIELDS[shape]}


def _string(path: Path, number: int, row: dict[str, Any], name: str, field: str | None = None) -> str:
    field = field or name
    if name not in row:
        raise DataError("is missing", path, number, field)
    value = row[name]
    if value is None:
        raise DataError("is null", path, number, field)
    if not isinstance(value, str):
        raise DataError(f"is {_kind(value)}, not a string", path, number, field)
    if not value.strip():
        raise DataError("is empty", path, number, field)
    return value


def _messages(path: Path, number: int, row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in row:
        raise DataError("is missing", path, number, "messages")
    turns = row["messages"]
    if turns is None:
        raise DataError("is null", path, number, "messages")
    if not isinstance(turns, list):
        raise DataError(f"is {_kind(turns)}, not a list of turns", path, number, "messages")
    if not turns:
        raise DataError("is empty", path, number, "messages")
    out = []
    for index, turn in enumerate(turns):
        label = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"is {_kind(turn)}, not an object with 'role' and 'content'", path, number, label)
        role = _string(path, number, turn, "role", f"{label}.role")
        content = turn.get("content")
        if role == "assistant" or content is None or not isinstance(content, str):
            content = _string(path, number, turn, "content", f"{label}.content")  # names the fault
        out.append({"role": role, "content": content})
    if not any(turn["role"] == "assistant" for turn in out):
        raise DataError("has no assistant turn (nothing to learn)", path, number, "messages")
    return out


def _canary(path: Path, number: int, row: Any) -> CanaryRecord:
    if not isinstance(row, dict):
        raise DataError(f"not an object with named fields but {_kind(row)}", path, number)
    for name, kind, said in (
        ("id", str, "a string"),
        ("text", str, "a string"),
        ("secrets", dict, "an object"),
        ("duplicates", int, "a whole number"),
        ("group", str, "a string"),
    ):
        if name not in row:
            raise DataError("is missing", path, number, name)
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            raise DataError(f"is {_kind(row[name])}, not {said}", path, number, name)
    if row["group"] not in get_args(Group):
        raise DataError(f"is not one of {', '.join(get_args(Group))}", path, number, "group")
    for position, value in enumerate(row["secrets"].values(), start=1):
        if not isinstance(value, str):
            raise DataError(f"entry {position} is {_kind(value)}, not a string", path, number, "secrets")
    return CanaryRecord(
        id=row["id"], text=row["text"], secrets=dict(row["secrets"]), duplicates=row["duplicates"], group=row["group"]
    )


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
