"""The coordinating site needs no torch: the server imports, starts and serves with torch absent."""

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed at the coordinating site")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def test_every_server_module_imports_with_torch_blocked() -> None:
    code = BLOCK_TORCH + (
        "import pkgutil, importlib, fedlora_server\n"
        "names = [m.name for m in pkgutil.walk_packages(fedlora_server.__path__, 'fedlora_server.') if not m.name.endswith('__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(names))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10


@pytest.mark.slow
def test_server_installs_and_starts_in_a_virtualenv_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            str(ROOT / "common"),
            str(ROOT / "server"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    config = tmp_path / "run.yaml"
    config.write_text(
        "base_model: tiny\nmin_workers: 1\nworkers:\n  - id: a\n    token_sha256: " + "ab" * 32 + "\n"
        f"state_dir: {tmp_path / 'state'}\nlisten:\n  port: 0\n  metrics_port: 0\n"
        "secure_aggregation:\n  enabled: false\n"
    )

    server = subprocess.Popen(
        [str(env_dir / "bin" / "fedlora-server"), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        health = subprocess.run(
            [
                str(python),
                "-c",
                "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;"
                f"s = g.HealthStub(grpc.insecure_channel('127.0.0.1:{ready['port']}'));"
                "print(h.HealthCheckResponse.ServingStatus.Name(s.Check(h.HealthCheckRequest(service='fedlora.v1.Coordinator'), timeout=10).status))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert ready["event"] == "listening"
    assert ready["port"] > 0
    assert health.stdout.strip() == "SERVING", health.stderr
