"""`fedlora-server` answers a bad config with exit code 2 and one line naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_server.cli import main

GOOD = """
base_model: tiny
workers:
  - id: clinical
    token_sha256: "%s"
min_workers: 1
secure_aggregation:
  enabled: false
""" % ("ab" * 32)


@pytest.mark.parametrize(
    ("content", "argv", "named"),
    [
        (GOOD + "mode: lorra\n", [], "mode:"),
        (GOOD + "rounds: 0\n", [], "rounds:"),
        (GOOD + "unknown_key: 1\n", [], "unknown_key: unknown setting"),
        (GOOD.replace("min_workers: 1", "min_workers: 5"), [], "min_workers: 5 exceeds"),
        (GOOD + "aggregation: ffa\nmode: full\n", [], "aggregation: ffa"),
        (GOOD, ["--lora.rank", "-1"], "lora.rank:"),
        (GOOD, ["--limits.max_streams", "200"], "max_worker_calls: 128 must exceed max_streams (200)"),
        (GOOD, ["--limits.max_streams_per_worker", "8"], "max_calls_per_worker: 8 must exceed max_streams_per_worker"),
        ("base_model: x\n", [], "workers:"),
    ],
)
def test_a_bad_config_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, argv: list[str], named: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)

    code = main(["--config", str(config), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.count("\n") == 1


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(GOOD)

    result = subprocess.run(
        [sys.executable, "-m", "fedlora_server", "--config", str(config)],
        env={"FEDLORA_ROUNDS": "zero", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("fedlora-server: config error: rounds:")
