"""Credentials as operators make them: a token file from `openssl rand -hex 32 > token`, its digest from `sha256sum`."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest

from fedlora_server.auth import Authenticator
from fedlora_server.config import WorkerEntry
from fedlora_server.errors import Unauthenticated
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import RetrySettings, WorkerSettings
from fedlora_worker.transport import CoordinatorClient
from tests.server.conftest import run_settings


def _sha256sum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("written", ["{token}\n", "{token}"], ids=["with-newline", "without"])
def test_a_token_files_sha256sum_admits_its_worker_whether_or_not_the_file_ends_in_a_newline(
    tmp_path: Path, written: str
) -> None:
    # Prepare: the token file, the allow-list entry from `sha256sum token`, the worker reading the file.
    token = secrets.token_hex(32)
    path = tmp_path / "token"
    path.write_text(written.format(token=token))
    settings = run_settings(tmp_path, workers=[{"id": "clinical", "token_sha256": _sha256sum(path)}], min_workers=1)
    worker = WorkerSettings.model_validate(
        {"worker_id": "clinical", "token_file": path, "base_model": "x", "data": {"train": [path]}}
    )

    # Execute
    with CoordinatorServer(settings=settings) as server:
        client = CoordinatorClient(
            target=f"127.0.0.1:{server.port}",
            worker_id="clinical",
            token=worker.bearer_token(),
            retry=RetrySettings(attempts=1),
        )
        try:
            spec = client.join(10)
        finally:
            client.close()

    # Assert
    assert spec.run_id == settings.run_id


def test_another_token_is_refused_even_one_with_the_newline_the_worker_strips() -> None:
    token = secrets.token_hex(32)
    authenticator = Authenticator(
        [WorkerEntry(id="clinical", token_sha256=hashlib.sha256(f"{token}\n".encode()).hexdigest())]
    )

    assert authenticator.owner(token) == "clinical"
    for wrong in (token[:-1], token + "x", f"{token}\n\n".strip() + " ", secrets.token_hex(32)):
        with pytest.raises(Unauthenticated, match="unknown credentials"):
            authenticator.owner(wrong)
