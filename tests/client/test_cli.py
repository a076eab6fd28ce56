"""`fedlora-worker` answers a bad config with exit code 2 and one line naming the field."""

from pathlib import Path

import pytest

from fedlora_worker.cli import main

GOOD = "worker_id: clinical\ntoken: s3cret\nbase_model: /models/base\ndata:\n  train: [{train}]\n"


@pytest.mark.parametrize(
    ("extra", "argv", "named"),
    [
        ("coordinatr: x\n", [], "coordinatr: unknown setting"),
        ("token_file: /tmp/t\n", [], "token: set exactly one of token or token_file"),
        ("threads: 0\n", [], "threads:"),
        ("", ["--retry.attempts", "0"], "retry.attempts:"),
        ("worker_id: 'bad id'\n", [], "worker_id:"),
    ],
)
def test_a_bad_config_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, argv: list[str], named: str
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a record"}\n')
    config = tmp_path / "worker.yaml"
    config.write_text(GOOD.format(train=train) + extra)

    code = main(["--config", str(config), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.count("\n") == 1


def test_missing_training_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text(GOOD.format(train=tmp_path / "absent.jsonl"))

    code = main(["--config", str(config)])

    assert code == 2
    assert "absent.jsonl" in capsys.readouterr().err
