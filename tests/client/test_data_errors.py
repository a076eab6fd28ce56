"""No error about a site's data quotes its records, wherever the error surfaces.

Every probe is a file holding known secrets (a distinctive name, a record number, an account
number) in values, JSON keys, csv header cells, parquet column names and chat roles, and breaking
one rule of the record files or canary files. Each runs through the library (`read_records`,
`read_canaries`, the audit's `load_canaries`), `fedlora-worker check-config` and the worker's
start-up as processes; what each prints, and the error itself, must name the file and the row
and hold no secret. A chat template that quotes a conversation when it refuses it is run through
a whole worker against a coordinator: its logs, its exit line and the reason the coordinator is
told hold no secret either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_worker.audit import load_canaries
from fedlora_worker.datafiles import DataError, read_canaries, read_records

NAME = "Zebulon Quarrington-Vasquez"
MRN = "MRN-4417-9023"
ACCOUNT = "ACCT-5540-1187-2290"
SECRETS = (NAME, MRN, ACCOUNT)
FRAGMENTS = ("Zebulon", "Quarrington", "Vasquez", "4417", "9023", "5540", "1187", "2290")
"""What a reviewer greps for: each secret, and the pieces a message could quote of one."""

TOKEN = "data-errors-token"


def _line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


SECRET_KEYS = {NAME: MRN, MRN: ACCOUNT, ACCOUNT: NAME}
GOOD_TEXT = _line({"text": "kalo miren tusa."})
CHAT_SECRET_ROLE = [{"role": NAME, "content": MRN}, {"role": "assistant", "content": ACCOUNT}]


@dataclass(frozen=True)
class Probe:
    """A file that breaks one rule, and the fault its error must say."""

    name: str
    file: str
    content: bytes
    fault: str
    row: str = ""
    """How the error names the place, after the file's path (" row 2"); empty: the file as a whole."""
    before: tuple[tuple[str, bytes], ...] = ()
    """Good files of the same data set, read before it."""


DATA_PROBES = [
    Probe(
        "csv-without-header",
        "notes.csv",
        f"{NAME},{MRN},{ACCOUNT}\n{ACCOUNT},{NAME},{MRN}\n".encode(),
        "the header row names no 'text', 'prompt'/'completion' or 'messages' column (it has 3 other columns",
    ),
    Probe(
        "csv-header-near-miss",
        "near.csv",
        f"Text ,{NAME}\n{MRN},{ACCOUNT}\n".encode(),
        "column 1 is 'text' in other case or spacing",
    ),
    Probe("csv-empty-text", "blank.csv", f"text,{NAME}\n ,{MRN}\n".encode(), "field 'text' is empty", " row 1"),
    Probe(
        "csv-short-row",
        "short.csv",
        f"prompt,completion\n{NAME} {MRN}\n".encode(),
        "field 'completion' is missing",
        " row 1",
    ),
    Probe(
        "csv-field-too-long",
        "long.csv",
        b"text\n" + f"{NAME} {MRN} ".encode() * 8000 + b"\n",
        "not valid CSV (a field longer than 131072 characters",
        " row 1",
    ),
    Probe(
        "csv-not-utf8-header",
        "latin1-header.csv",
        f"{NAME}".encode() + b"\xe9," + MRN.encode() + b"\nx,y\n",
        "the header row is not UTF-8 text (at byte 28 of the line)",
    ),
    Probe(
        "csv-not-utf8-row",
        "latin1.csv",
        b"text\n" + NAME.encode() + b" caf\xe9 " + MRN.encode() + b"\n",
        "not UTF-8 text (at byte 32 of the line)",
        " row 1",
    ),
    Probe(
        "jsonl-not-utf8",
        "latin1.jsonl",
        GOOD_TEXT + b'{"text": "' + NAME.encode() + b"\xe9 " + MRN.encode() + b'"}\n',
        "not UTF-8 text (at byte 38 of the line)",
        " row 2",
    ),
    Probe("empty", "empty.jsonl", b"", "empty file (no records)"),
    Probe(
        "jsonl-unterminated",
        "cut.jsonl",
        GOOD_TEXT + f'{{"text": "{NAME} {MRN}'.encode() + b"\n",
        "not valid JSON (Unterminated string starting at column 10)",
        " row 2",
    ),
    Probe(
        "jsonl-bad-escape",
        "escape.jsonl",
        f'{{"text": "{NAME} \\q {MRN}"}}\n'.encode(),
        "not valid JSON (Invalid \\escape at column 39)",
        " row 1",
    ),
    Probe(
        "jsonl-secret-as-bare-word",
        "bare.jsonl",
        f'{{"text": {MRN}}}\n'.encode(),
        "not valid JSON (Expecting value at column 10)",
        " row 1",
    ),
    Probe(
        "json-array-broken",
        "broken.json",
        f'[{{"text": "{NAME}"}}, {{"text": "{MRN}",]'.encode(),
        "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 68)",
    ),
    Probe(
        "json-object-of-secrets",
        "object.json",
        json.dumps(SECRET_KEYS).encode(),
        "expected a JSON array of records (or one object per line), got an object",
    ),
    Probe(
        "jsonl-nested-too-deeply",
        "deep.jsonl",
        b'{"text": ' + b"[" * 100_000 + f'"{NAME}"'.encode() + b"]" * 100_000 + b"}\n",
        "not valid JSON (nested too deeply in the line)",
        " row 1",
    ),
    Probe(
        "jsonl-number-too-long",
        "digits.jsonl",
        f'{{"{NAME}": {"4417" * 2000}}}\n'.encode(),
        "not valid JSON (a number too long to read in the line)",
        " row 1",
    ),
    Probe(
        "jsonl-row-a-list", "list.jsonl", _line(list(SECRETS)), "not an object with named fields but a list", " row 1"
    ),
    Probe("jsonl-row-a-string", "string.jsonl", _line(NAME), "not an object with named fields but a string", " row 1"),
    Probe(
        "jsonl-unknown-keys",
        "keys.jsonl",
        _line(SECRET_KEYS),
        "no 'text', 'prompt'/'completion' or 'messages' field (it has 3 other fields, not named here)",
        " row 1",
    ),
    Probe(
        "jsonl-near-miss-key",
        "near.jsonl",
        _line({NAME: MRN, " Prompt": ACCOUNT}),
        "field 2 is 'prompt' in other case or spacing",
        " row 1",
    ),
    Probe(
        "jsonl-text-an-object",
        "object.jsonl",
        _line({"text": SECRET_KEYS}),
        "field 'text' is an object, not a string",
        " row 1",
    ),
    Probe(
        "jsonl-text-a-list",
        "typed.jsonl",
        GOOD_TEXT + _line({"text": list(SECRETS)}),
        "field 'text' is a list, not a string",
        " row 2",
    ),
    Probe(
        "jsonl-text-null",
        "null.jsonl",
        _line({"text": None, **SECRET_KEYS}),
        "field 'text' is null",
        " row 1",
    ),
    Probe(
        "jsonl-text-blank",
        "blank.jsonl",
        GOOD_TEXT + _line({"text": " \n ", **SECRET_KEYS}),
        "field 'text' is empty",
        " row 2",
    ),
    Probe(
        "prompt-without-completion",
        "half.jsonl",
        _line({"prompt": f"{NAME} {MRN}", ACCOUNT: NAME}),
        "field 'completion' is missing",
        " row 1",
    ),
    Probe(
        "completion-a-number",
        "number.jsonl",
        _line({"prompt": NAME, "completion": 4417_9023}),
        "field 'completion' is a number, not a string",
        " row 1",
    ),
    Probe(
        "mixed-shapes-in-a-file",
        "mixed.jsonl",
        GOOD_TEXT + _line({"prompt": NAME, "completion": MRN}),
        "field 'text' is missing",
        " row 2",
    ),
    Probe(
        "mixed-shapes-across-files",
        "chat.jsonl",
        _line({"messages": CHAT_SECRET_ROLE}),
        "records are chat 'messages' but",
        before=(("text.jsonl", GOOD_TEXT),),
    ),
    Probe(
        "messages-a-string",
        "chat-str.jsonl",
        _line({"messages": f"{NAME} {MRN}"}),
        "field 'messages' is a string, not a list of turns",
        " row 1",
    ),
    Probe(
        "turn-a-string",
        "chat-turn.jsonl",
        _line({"messages": [NAME, {"role": "assistant", "content": MRN}]}),
        "messages[0] is a string, not an object with 'role' and 'content'",
        " row 1",
    ),
    Probe(
        "role-a-list",
        "chat-role.jsonl",
        _line({"messages": [{"role": [NAME], "content": MRN}]}),
        "messages[0].role is a list, not a string",
        " row 1",
    ),
    Probe(
        "turn-of-secret-keys",
        "chat-keys.jsonl",
        _line({"messages": [SECRET_KEYS, {"role": "assistant", "content": MRN}]}),
        "messages[0].role is missing",
        " row 1",
    ),
    Probe(
        "secret-roles-no-assistant",
        "chat-roles.jsonl",
        _line({"messages": [{"role": NAME, "content": MRN}, {"role": ACCOUNT, "content": NAME}]}),
        "field 'messages' has no assistant turn (nothing to learn)",
        " row 1",
    ),
    Probe(
        "assistant-content-blank",
        "chat-blank.jsonl",
        _line({"messages": [{"role": NAME, "content": MRN}, {"role": "assistant", "content": ""}]}),
        "messages[1].content is empty",
        " row 1",
    ),
    Probe(
        "parquet-secret-columns",
        "columns.parquet",
        _parquet(pa.table({NAME: [MRN], MRN: [ACCOUNT]})),
        "no 'text', 'prompt'/'completion' or 'messages' column (it has 2 other columns, not named here)",
        " row 1",
    ),
    Probe(
        "parquet-text-of-lists",
        "lists.parquet",
        _parquet(pa.table({"text": [list(SECRETS)], ACCOUNT: [NAME]})),
        "field 'text' is a list, not a string",
        " row 1",
    ),
    Probe(
        "parquet-secret-roles",
        "chat.parquet",
        _parquet(pa.table({"messages": [[{"role": NAME, "content": MRN}]]})),
        "field 'messages' has no assistant turn (nothing to learn)",
        " row 1",
    ),
    Probe(
        "parquet-corrupt",
        "corrupt.parquet",
        b"PAR1" + f"{NAME} {MRN} {ACCOUNT}".encode() * 40 + b"PAR1",
        "not a readable parquet file (",
    ),
]

_CANARY = {"id": "c1", "text": f"{NAME} {MRN}", "secrets": {"name": NAME, "record_id": MRN}, "duplicates": 1}

CANARY_PROBES = [
    Probe(
        "canary-unterminated",
        "canaries.jsonl",
        f'{{"id": "{MRN}", "text": "{NAME}'.encode() + b"\n",
        "not valid JSON (Unterminated string starting at column 33)",
        " row 1",
    ),
    Probe(
        "canary-not-utf8",
        "canaries.jsonl",
        b'{"id": "' + NAME.encode() + b'\xe9"}\n',
        "not UTF-8 text (at byte 36 of the line)",
        " row 1",
    ),
    Probe(
        "canary-secret-group",
        "canaries.jsonl",
        _line({**_CANARY, "group": "1x"}) + _line({**_CANARY, "group": NAME}),
        "field 'group' is not one of 1x, 10x, control",
        " row 2",
    ),
    Probe(
        "canary-secret-not-a-string",
        "canaries.jsonl",
        _line({**_CANARY, "group": "1x", "secrets": {"name": [NAME], "account": ACCOUNT}}),
        "field 'secrets' entry 1 is a list, not a string",
        " row 1",
    ),
    Probe(
        "canary-secret-keys-only",
        "canaries.jsonl",
        _line(SECRET_KEYS),
        "field 'id' is missing",
        " row 1",
    ),
    Probe(
        "canary-id-a-number",
        "canaries.jsonl",
        _line({**_CANARY, "id": 4417_9023, "group": "1x"}),
        "field 'id' is a number, not a string",
        " row 1",
    ),
    Probe(
        "canary-a-list",
        "canaries.jsonl",
        _line(list(SECRETS)),
        "not an object with named fields but a list",
        " row 1",
    ),
]


def _write(tmp_path: Path, probe: Probe) -> list[Path]:
    paths = []
    for name, content in (*probe.before, (probe.file, probe.content)):
        path = tmp_path / name
        path.write_bytes(content)
        paths.append(path)
    return paths


def _worker_yaml(
    tmp_path: Path, *, train: Sequence[Path], canaries: Sequence[Path] = (), base: str = "/models/base"
) -> Path:
    config = tmp_path / "worker.yaml"
    data: dict[str, Any] = {"train": [str(p) for p in train]}
    if canaries:
        data["canaries"] = [str(p) for p in canaries]
    settings = {"worker_id": "clinical", "token": TOKEN, "base_model": base, "progress": False, "data": data}
    config.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
    return config


def _fedlora_worker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlora_worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _quoted(*outputs: str) -> list[str]:
    """The secrets, or pieces of them, that any of the outputs holds; a run of digits only where no digit goes on
    either side (a log timestamp's microseconds or a port may hold "2290" by chance; a quoted account number is
    cut at its dashes)."""
    patterns = [
        re.escape(piece) if not piece.isdigit() else rf"(?<!\d){piece}(?!\d)" for piece in (*SECRETS, *FRAGMENTS)
    ]
    return [
        piece
        for piece, pattern in zip((*SECRETS, *FRAGMENTS), patterns, strict=True)
        if any(re.search(pattern, output) for output in outputs)
    ]


def _ids(probes: list[Probe]) -> list[str]:
    return [probe.name for probe in probes]


@pytest.mark.parametrize("probe", DATA_PROBES, ids=_ids(DATA_PROBES))
def test_a_record_file_error_names_the_file_and_row_and_quotes_no_record(tmp_path: Path, probe: Probe) -> None:
    paths = _write(tmp_path, probe)

    with pytest.raises(DataError) as refused:
        read_records(paths)

    message = str(refused.value)
    assert message.startswith(f"{paths[-1]}{probe.row}: "), message
    assert probe.fault in message
    assert "\n" not in message
    assert _quoted(message, repr(refused.value), repr(refused.value.args)) == []


@pytest.mark.parametrize("probe", CANARY_PROBES, ids=_ids(CANARY_PROBES))
@pytest.mark.parametrize("reader", [read_canaries, load_canaries], ids=["read_canaries", "audit.load_canaries"])
def test_a_canary_file_error_names_the_file_and_row_and_quotes_no_record(
    tmp_path: Path, probe: Probe, reader: Callable[[list[Path]], object]
) -> None:
    paths = _write(tmp_path, probe)

    with pytest.raises(DataError) as refused:
        reader(paths)

    message = str(refused.value)
    assert message.startswith(f"{paths[-1]}{probe.row}: "), message
    assert probe.fault in message
    assert _quoted(message, repr(refused.value)) == []


# Every probe through check-config; start-up runs the same checks before it joins, so a sample of the probes
# (every sixth of each kind) goes through it too: the suite's time, not the class, is what the sample saves.
PROGRAM_CASES = [(probe, ["check-config"], "check-config") for probe in DATA_PROBES + CANARY_PROBES] + [
    (probe, [], "start-up") for probe in DATA_PROBES[::6] + CANARY_PROBES[::6]
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("probe", "command"),
    [(probe, command) for probe, command, _ in PROGRAM_CASES],
    ids=[f"{how}-{_ids([probe])[0]}" for probe, _, how in PROGRAM_CASES],
)
def test_fedlora_worker_refuses_a_bad_file_in_one_line_that_quotes_no_record(
    tmp_path: Path, probe: Probe, command: list[str]
) -> None:
    # Prepare: the probe's files as data.train, or as data.canaries beside good training records.
    paths = _write(tmp_path, probe)
    canary = probe in CANARY_PROBES
    if canary:
        good = tmp_path / "train.jsonl"
        good.write_bytes(GOOD_TEXT)
        config = _worker_yaml(tmp_path, train=[good], canaries=paths)
    else:
        config = _worker_yaml(tmp_path, train=paths)

    # Execute
    result = _fedlora_worker(*command, "--config", str(config))

    # Assert: exit 2, one line naming the setting, the file, the row and the fault; no secret anywhere.
    setting = "data.canaries" if canary else "data.train"
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"fedlora-worker: {setting}: {paths[-1]}{probe.row}: "), result.stderr
    assert probe.fault in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert _quoted(result.stdout, result.stderr) == []


SECRET_QUOTING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role'] + ' saying ' + m['content']) }}"
    "{% endif %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
"""A template that refuses a conversation by quoting it, as some in the wild do."""


@pytest.mark.slow
def test_a_worker_whose_template_refuses_a_record_tells_the_coordinator_why_without_quoting_it(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    # Prepare: the base with a template that quotes what it refuses, chat records whose second has
    # a role the template refuses, and a coordinator of one round.
    base = tmp_path / "base"
    shutil.copytree(tiny_base_model, base)
    (base / "chat_template.jinja").write_text(SECRET_QUOTING_TEMPLATE, encoding="utf-8")
    train = tmp_path / "chat.jsonl"
    fine = [{"role": "user", "content": "kalo?"}, {"role": "assistant", "content": "miren."}]
    train.write_bytes(_line({"messages": fine}) + _line({"messages": CHAT_SECRET_ROLE}))
    settings = RunSettings.model_validate(
        {
            "run_id": "quoting-template",
            "base_model": str(base),
            "min_workers": 1,
            "rounds": 1,
            "workers": [{"id": "clinical", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}],
            "secure_aggregation": {"enabled": False},
            "state_dir": tmp_path / "coordinator",
            "lora": {"rank": 2},
            "training": {"local_steps": 1, "batch_size": 1, "max_seq_len": 32},
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 20},
        }
    )
    with CoordinatorServer(settings=settings) as server:
        config = _worker_yaml(tmp_path, train=[train], base=str(base))
        text = json.loads(config.read_text())
        config.write_text(json.dumps({**text, "coordinator": f"127.0.0.1:{server.port}", "threads": 1}))

        # Execute
        result = _fedlora_worker("--config", str(config), timeout=300)
        report = json.loads(server.write_report()[0].read_text())

    # Assert: the worker stopped on its data and said where (record 2, the template's refusal by
    # its class); its logs, its last line and the coordinator's record of why it left quote nothing.
    (worker,) = report["workers"]
    reason = worker["left"]
    assert result.returncode == 1, result.stderr[-3000:]
    assert reason.startswith("DataError: record 2: the chat template of "), reason
    assert reason.endswith("refused a conversation: TemplateError"), reason
    assert result.stderr.splitlines()[-1] == f"fedlora-worker: cannot go on: {reason}"
    assert '"event": "cannot_go_on"' in result.stderr
    assert _quoted(result.stdout, result.stderr, json.dumps(report)) == []
