"""What the deployment tests share: free loopback ports, settings written as files, processes that stop."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

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
    argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=cwd, env=program_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
