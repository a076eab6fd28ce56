"""What the deployment tests share: free loopback ports, settings written as files, processes that stop."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for programs that cannot bind port 0 themselves (prometheus)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def program_env(**extra: str) -> dict[str, str]:
    """The environment of a program the tests start: the venv's programs first on PATH, one thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLORA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_program(
    argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 60, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=program_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def entrypoint(dockerfile: Path) -> list[str]:
    """The ENTRYPOINT of a Dockerfile (exec form)."""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith("ENTRYPOINT "):
            argv: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
            return argv
    raise AssertionError(f"{dockerfile} has no ENTRYPOINT")


def coordinator_command(config: str | Path) -> list[str]:
    """How the coordinator is started, in the process tests as in the images (ENTRYPOINT + command)."""
    return ["fedlora-server", "--config", str(config)]


def worker_command(config: str | Path) -> list[str]:
    """How a worker is started, in the process tests as in the images (ENTRYPOINT + command)."""
    return ["fedlora-worker", "--config", str(config)]


def paths_named(settings: BaseModel) -> list[Path]:
    """Every path a settings object names, however deep (files its program will open)."""
    found: list[Path] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, Path):
                found.append(item)
            elif isinstance(item, BaseModel):
                found += paths_named(item)
    return found


def identity_public_of(key_file: Path) -> str:
    """The public half of an identity key file `fedlora-worker keygen` wrote."""
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_file.read_text(encoding="utf-8").strip()))
    return private.public_key().public_bytes_raw().hex()
