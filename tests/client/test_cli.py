"""`fedlora-worker` as a data holder meets it: every fault a site can have on its own (settings, data files,
base model) is one line and exit code 2 before the worker joins; `check-config` checks without starting
anything; `--check` probes the coordinator; a run the site's model cannot take is refused at join."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedlora_server.certs import issue_certificates
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_worker import cli
from fedlora_worker.cli import main
from tests.server.conftest import run_settings

GOOD = "worker_id: clinical\ntoken: s3cret\nbase_model: /models/base\ndata:\n  train: [{train}]\n"
WORKER = "worker_id: clinical\ntoken: s3cret\nbase_model: {base}\ncoordinator: {coordinator}\nprogress: false\n"
CHAT = [{"role": "user", "content": "kalo?"}, {"role": "assistant", "content": "miren."}]


def worker_yaml(tmp_path: Path, base: Path | str, train: list[Path], coordinator: str = "127.0.0.1:1") -> Path:
    config = tmp_path / "worker.yaml"
    lines = "".join(f"    - {path}\n" for path in train)
    config.write_text(WORKER.format(base=base, coordinator=coordinator) + f"data:\n  train:\n{lines}")
    return config


def text_file(path: Path, count: int = 4) -> Path:
    path.write_text("".join(json.dumps({"text": f"kalo miren {i}."}) + "\n" for i in range(count)), encoding="utf-8")
    return path


@pytest.fixture
def never_joins(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replaces the part of the CLI that joins: what reaches it passed every check before the join."""
    joined: list[object] = []

    def run(settings: object) -> int:
        joined.append(settings)
        return 0

    monkeypatch.setattr(cli, "run", run)
    return joined


def fedlora_worker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The installed program in a fresh interpreter, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fedlora_worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "argv", "named"),
    [
        ("coordinatr: x\n", [], "coordinatr: unknown setting"),
        ("token_file: /tmp/t\n", [], "token: set exactly one of token or token_file"),
        ("threads: 0\n", [], "threads:"),
        ("", ["--retry.attempts", "0"], "retry.attempts:"),
        ("", ["--worker_id", "bad id"], "worker_id:"),
        ("worker_id: second\n", [], "key 'worker_id' is given twice; keep one"),
    ],
)
@pytest.mark.parametrize("command", [[], ["check-config"]], ids=["run", "check-config"])
def test_a_bad_config_exits_2_with_one_line_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    never_joins: list[object],
    extra: str,
    argv: list[str],
    named: str,
    command: list[str],
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a record"}\n')
    config = tmp_path / "worker.yaml"
    config.write_text(GOOD.format(train=train) + extra)

    code = main([*command, "--config", str(config), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.count("\n") == 1
    assert never_joins == []


# ---- data files ---------------------------------------------------------------------------

BAD_DATA = [
    ("empty.jsonl", b"", "empty.jsonl: empty file (no records)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin1.jsonl row 2: not UTF-8 text (at byte 14"),
    ("null.jsonl", b'{"text": "ok"}\n{"text": null}\n', "null.jsonl row 2: field 'text' is null"),
    ("blanks.jsonl", b'{"text": ""}\n{"text": ""}\n', "blanks.jsonl row 1: field 'text' is empty"),
    ("typed.jsonl", b'{"text": ["a"]}\n', "typed.jsonl row 1: field 'text' is a list, not a string"),
    ("records.txt", b"a record\n", "records.txt: unknown suffix '.txt'"),
    ("absent.jsonl", None, "absent.jsonl: no such file"),
]


@pytest.mark.parametrize(("name", "content", "fault"), BAD_DATA, ids=[name for name, _, _ in BAD_DATA])
@pytest.mark.parametrize("command", [[], ["check-config"]], ids=["run", "check-config"])
def test_an_unusable_data_file_exits_2_before_the_join_naming_the_file_the_row_and_the_fault(
    tmp_path: Path,
    tiny_base_model: Path,
    capsys: pytest.CaptureFixture[str],
    never_joins: list[object],
    name: str,
    content: bytes | None,
    fault: str,
    command: list[str],
) -> None:
    # Prepare: a good base model and a good first file, then the bad one.
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    config = worker_yaml(tmp_path, tiny_base_model, [text_file(tmp_path / "good.jsonl"), bad])

    # Execute
    code = main([*command, "--config", str(config)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fedlora-worker: data.train: {tmp_path}/{fault}" + err.split(fault, 1)[1]
    assert err.count("\n") == 1
    assert never_joins == []


def test_chat_records_need_a_chat_template_before_the_join(
    tmp_path: Path, tiny_base_model: Path, capsys: pytest.CaptureFixture[str], never_joins: list[object]
) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT}) + "\n")
    with_template = tmp_path / "with-template"
    shutil.copytree(tiny_base_model, with_template)
    (with_template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    refused = main(["--config", str(worker_yaml(tmp_path, tiny_base_model, [chat]))])
    err = capsys.readouterr().err
    accepted = main(["--config", str(worker_yaml(tmp_path, with_template, [chat]))])

    assert refused == 2
    assert err.startswith("fedlora-worker: data.train: chat records ('messages') are rendered with the tokenizer's")
    assert f"the tokenizer of {tiny_base_model} has none" in err
    assert err.count("\n") == 1
    assert accepted == 0
    assert len(never_joins) == 1


# ---- base model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remove", "fault"),
    [
        (None, "no such directory"),
        ("config.json", "no config.json: not a transformers model directory"),
        ("tokenizer.json", "no tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json"),
        ("model.safetensors", "no weights (model.safetensors or pytorch_model.bin)"),
    ],
)
def test_a_base_model_directory_that_cannot_load_exits_2_before_the_join(
    tmp_path: Path,
    tiny_base_model: Path,
    capsys: pytest.CaptureFixture[str],
    never_joins: list[object],
    remove: str | None,
    fault: str,
) -> None:
    base = tmp_path / "base"
    if remove is not None:
        shutil.copytree(tiny_base_model, base)
        (base / remove).unlink()
    config = worker_yaml(tmp_path, base, [text_file(tmp_path / "train.jsonl")])

    code = main(["--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fedlora-worker: base_model: {base}: {fault}" + err.split(fault, 1)[1]
    assert err.count("\n") == 1
    assert never_joins == []


def test_a_hub_id_offline_and_not_cached_exits_2_in_one_line(tmp_path: Path) -> None:
    config = worker_yaml(tmp_path, "meta-llama/Llama-3.2-1B", [text_file(tmp_path / "train.jsonl")])

    result = fedlora_worker("--config", str(config), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})

    assert result.returncode == 2
    assert result.stderr.startswith(
        "fedlora-worker: base_model: meta-llama/Llama-3.2-1B is not a local directory nor in the Hugging Face cache, "
        "and HF_HUB_OFFLINE is set"
    )
    assert result.stderr.count("\n") == 1


def test_a_hub_id_that_cannot_be_reached_exits_2_at_once_without_retrying(tmp_path: Path) -> None:
    config = worker_yaml(tmp_path, "meta-llama/Llama-3.2-1B", [text_file(tmp_path / "train.jsonl")])
    hub = f"http://127.0.0.1:{closed_port()}"

    started = time.monotonic()
    result = fedlora_worker("--config", str(config), env={"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")})
    seconds = time.monotonic() - started

    assert result.returncode == 2
    assert result.stderr.startswith(
        "fedlora-worker: base_model: meta-llama/Llama-3.2-1B: cannot reach the Hugging Face Hub (ConnectError"
    )
    assert result.stderr.count("\n") == 1
    assert seconds < 15  # huggingface_hub's own download retries for ~25 s


def test_a_hub_id_in_the_cache_resolves_offline(tmp_path: Path, tiny_base_model: Path) -> None:
    # Prepare: the Hugging Face cache layout of one downloaded snapshot.
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_base_model, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    config = worker_yaml(tmp_path, "acme/tiny-llama", [text_file(tmp_path / "train.jsonl")])

    # Execute
    result = fedlora_worker("check-config", str(config), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})

    # Assert
    assert result.returncode == 0, result.stderr
    assert "  base_model: acme/tiny-llama (cache, LlamaForCausalLM; chat template: no)\n" in result.stdout


# ---- check-config -------------------------------------------------------------------------


def test_check_config_reports_what_it_checked_and_starts_nothing(
    tmp_path: Path, tiny_base_model: Path, capsys: pytest.CaptureFixture[str], never_joins: list[object]
) -> None:
    config = worker_yaml(
        tmp_path, tiny_base_model, [text_file(tmp_path / "a.jsonl", 3), text_file(tmp_path / "b.jsonl")]
    )

    code = main(["check-config", str(config)])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        f"{config}: ok",
        "  data.train: 7 records (text) in 2 file(s)",
        f"  base_model: {tiny_base_model} (local, LlamaForCausalLM; chat template: no)",
        "  coordinator: 127.0.0.1:1 (plaintext; not contacted: --check probes it)",
    ]
    assert never_joins == []


def test_check_config_reads_the_canary_files_row_by_row_and_counts_them(
    tmp_path: Path, tiny_base_model: Path, capsys: pytest.CaptureFixture[str], never_joins: list[object]
) -> None:
    canary = {"id": "c1", "text": "kalo miren.", "secrets": {"record_id": "1234"}, "duplicates": 1}
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text("".join(json.dumps({**canary, "group": g}) + "\n" for g in ("1x", "10x", "control")))
    config = worker_yaml(tmp_path, tiny_base_model, [text_file(tmp_path / "train.jsonl")])
    config.write_text(config.read_text() + f"  canaries:\n    - {canaries}\n")

    accepted = main(["check-config", str(config)])
    out = capsys.readouterr().out
    canaries.write_text(json.dumps({**canary, "group": "2x"}) + "\n")
    refused = main(["check-config", str(config)])
    err = capsys.readouterr().err

    assert accepted == 0
    assert "  data.canaries: 3 records (1 of them controls)\n" in out
    assert refused == 2
    assert err == f"fedlora-worker: data.canaries: {canaries} row 1: field 'group' is not one of 1x, 10x, control\n"


def test_check_config_answers_in_under_two_seconds_without_loading_torch(tmp_path: Path, tiny_base_model: Path) -> None:
    # Prepare: the tiny test data; a fresh interpreter each time, as an operator's shell runs it.
    config = worker_yaml(tmp_path, tiny_base_model, [text_file(tmp_path / "train.jsonl", 200)])
    code = (
        "import sys\n"
        "from fedlora_worker.cli import main\n"
        f"code = main(['check-config', {str(config)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
        "sys.exit(code)\n"
    )

    # Execute: best of three, so a neighbour's burst of CPU does not decide it.
    timings, results = [], []
    for _ in range(3):
        started = time.monotonic()
        results.append(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60))
        timings.append(time.monotonic() - started)

    # Assert
    assert all(r.returncode == 0 for r in results), results[0].stderr
    assert all("heavy: []" in r.stdout for r in results)
    assert min(timings) < 2.0, timings


def test_help_lists_the_commands_every_setting_and_the_settings_reference() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from fedlora_worker.cli import main; main(['--help']); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert any(line.strip().startswith("check-config worker.yaml") for line in lines)
    assert any(line.strip().startswith("--check --config worker.yaml") for line in lines)
    assert any(line.strip().startswith("--retry.attempts") for line in lines)
    assert any(line.strip().startswith("--data.train") for line in lines)
    assert "docs/reference/settings.md" in result.stdout
    assert lines[-1] == "False"  # no torch for a help text


# ---- --check (container health) -----------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


@pytest.mark.parametrize(
    ("status", "code", "line"),
    [
        (health_pb2.HealthCheckResponse.SERVING, 0, ""),
        (health_pb2.HealthCheckResponse.NOT_SERVING, 1, "fedlora-worker: coordinator 127.0.0.1:{port}: NOT_SERVING\n"),
    ],
)
def test_check_exits_0_only_when_the_coordinator_answers_serving(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    health_server: tuple[int, health.HealthServicer],
    status: int,
    code: int,
    line: str,
) -> None:
    port, servicer = health_server
    servicer.set("", status)
    config = worker_yaml(tmp_path, "/models/base", [tmp_path / "train.jsonl"], coordinator=f"127.0.0.1:{port}")

    exit_code = main(["--check", "--config", str(config)])

    assert exit_code == code
    assert capsys.readouterr().err == line.format(port=port)


def test_check_exits_1_in_one_line_when_nothing_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    config = worker_yaml(tmp_path, "/models/base", [tmp_path / "train.jsonl"], coordinator=f"127.0.0.1:{port}")

    code = main(["--check", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"fedlora-worker: coordinator 127.0.0.1:{port}: UNAVAILABLE")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("tls", "code", "cause"),
    [
        ("tls: {{ca: {d}/ca.crt, cert: {d}/clinical.crt, key: {d}/clinical.key}}\n", 0, ""),
        # no client certificate for a coordinator that requires one: named by its cause
        ("tls: {{ca: {d}/ca.crt}}\n", 1, ": tls: the coordinator at {at} requires a client certificate and this "),
        ("", 1, ""),  # plaintext to a TLS port
    ],
    ids=["mutual-tls", "no-client-cert", "plaintext"],
)
def test_check_speaks_to_the_coordinator_with_the_workers_tls_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tls: str, code: int, cause: str
) -> None:
    # Prepare: a coordinator that requires mutual TLS, and this worker's certificate from the same CA.
    certs = tmp_path / "tls"
    issue_certificates(certs, workers=["clinical"])
    listen = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "tls": {"cert": certs / "coordinator.crt", "key": certs / "coordinator.key", "client_ca": certs / "ca.crt"},
    }
    with CoordinatorServer(settings=run_settings(tmp_path / "state", listen=listen)) as server:
        config = worker_yaml(
            tmp_path, "/models/base", [tmp_path / "train.jsonl"], coordinator=f"localhost:{server.port}"
        )
        config.write_text(config.read_text() + tls.format(d=certs))

        # Execute
        exit_code = main(["--check", "--config", str(config)])

    # Assert
    streams = capsys.readouterr()
    assert exit_code == code
    if code == 0:
        assert streams.out.splitlines()[-1] == f"coordinator localhost:{server.port}: SERVING"
    else:
        at = f"localhost:{server.port}"
        assert streams.err.startswith(f"fedlora-worker: coordinator {at}: UNAVAILABLE{cause.format(at=at)}")
        assert streams.err.count("\n") == 1


# ---- refusal at join ----------------------------------------------------------------------


def test_a_run_whose_targets_match_only_part_of_the_model_is_refused_at_join_and_the_coordinator_told(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    # Prepare: a run naming Phi-3's fused projections beside q_proj; this site holds a Llama.
    settings = RunSettings.model_validate(
        {
            "run_id": "mismatch",
            "base_model": str(tiny_base_model),
            "min_workers": 1,
            "workers": [{"id": "clinical", "token_sha256": hashlib.sha256(b"s3cret").hexdigest()}],
            "secure_aggregation": {"enabled": False},
            "state_dir": tmp_path / "coordinator",
            "lora": {"target_modules": ["q_proj", "qkv_proj", "gate_up_proj"]},
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 20},
        }
    )
    with CoordinatorServer(settings=settings) as server:
        config = worker_yaml(
            tmp_path, tiny_base_model, [text_file(tmp_path / "train.jsonl")], coordinator=f"127.0.0.1:{server.port}"
        )

        # Execute
        result = fedlora_worker("--config", str(config), timeout=300)
        report = json.loads(server.write_report()[0].read_text())

    # Assert: exit 2, one line naming the unmatched targets and the model's layers; the coordinator
    # has the same reason, and nothing was trained.
    last = result.stderr.splitlines()[-1]
    reason = last.removeprefix("fedlora-worker: this site refuses the run: ")
    assert result.returncode == 2, result.stderr[-2000:]
    assert reason.startswith("lora.target_modules: qkv_proj, gate_up_proj match no module of ")
    assert reason.endswith(
        "its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (all-linear adapts them all)"
    )
    assert report["workers"] == [
        {"id": "clinical", "num_examples": 4, "rank": settings.lora.rank, "base_precision": None, "left": reason}
    ]
    assert report["rounds"] == []


@pytest.mark.parametrize(
    ("site", "message"),
    [
        (
            "lora:\n  max_rank: 2\n",
            "rank 2: this run trains rank 4 at every site; a site of less rank takes part only in a run with "
            "aggregation: hetlora",
        ),
        (
            "base_precision: nf4\n",
            "base_precision 'nf4': this run allows bfloat16, float32 (run.yaml base_precisions); set one of them in "
            "worker.yaml",
        ),
    ],
    ids=["rank-below-the-runs-without-hetlora", "precision-the-run-does-not-allow"],
)
def test_a_site_whose_rank_or_precision_the_run_does_not_admit_exits_2_in_one_line_at_the_join(
    tmp_path: Path, tiny_base_model: Path, site: str, message: str
) -> None:
    # Prepare: a plain fedavg LoRA run of rank 4; the site asks for less rank, or a 4-bit base.
    settings = RunSettings.model_validate(
        {
            "run_id": "unequal",
            "base_model": str(tiny_base_model),
            "min_workers": 1,
            "workers": [{"id": "clinical", "token_sha256": hashlib.sha256(b"s3cret").hexdigest()}],
            "secure_aggregation": {"enabled": False},
            "state_dir": tmp_path / "coordinator",
            "lora": {"rank": 4, "alpha": 8},
            "listen": {"port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": 20},
        }
    )
    with CoordinatorServer(settings=settings) as server:
        config = worker_yaml(
            tmp_path, tiny_base_model, [text_file(tmp_path / "train.jsonl")], coordinator=f"127.0.0.1:{server.port}"
        )
        config.write_text(config.read_text() + site)

        # Execute
        result = fedlora_worker("--config", str(config), timeout=300)
        report = json.loads(server.write_report()[0].read_text())

    # Assert: exit 2 and one line saying what the run admits; the site never joined, nothing trained.
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        result.stderr.splitlines()[-1] == f"fedlora-worker: the coordinator refused: join: PERMISSION_DENIED: {message}"
    )
    assert "Traceback" not in result.stderr
    assert report["workers"] == []
    assert report["rounds"] == []


def test_a_metrics_port_in_use_is_one_line_naming_it_and_exit_2(tmp_path: Path, tiny_base_model: Path) -> None:
    # Prepare: a site whose checks all pass, and its metrics port taken by another program.
    config = worker_yaml(tmp_path, tiny_base_model, [text_file(tmp_path / "train.jsonl")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text() + f"metrics_port: {port}\n")

        # Execute
        result = fedlora_worker("--config", str(config))

    # Assert
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fedlora-worker:")]
    assert lines == [f"fedlora-worker: metrics_port: cannot listen on 127.0.0.1:{port}: Address already in use"]
