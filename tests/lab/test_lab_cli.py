"""fedlora-lab's demo flags: what run.yaml they make, and one readable line for a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora_lab.cli import _privacy_settings, build_parser, main


def test_the_private_flag_set_becomes_the_run_privacy_and_audit_sections() -> None:
    args = build_parser().parse_args(["demo", "--out", "x", "--dp-epsilon", "8", "--goldfish", "--audit-every", "2"])

    settings = _privacy_settings(args)

    assert settings == {
        "privacy": {
            "client_dp": {"clip_norm": 0.5, "delta": 1e-5, "target_epsilon": 8.0},
            "goldfish": {"k": 4, "h": 13},
        },
        "audit": {"every": 2},
    }


def test_dp_sgd_flags_and_no_audit() -> None:
    args = build_parser().parse_args(["demo", "--out", "x", "--dp-sgd-noise", "1.2", "--audit-every", "0"])

    assert _privacy_settings(args) == {
        "privacy": {"record_dp": {"noise_multiplier": 1.2, "max_grad_norm": 1.0, "delta": 1e-5}}
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-clip", "-1"], "--dp-clip: must be > 0.0"),
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--audit-every", "often"], "--audit-every: expected a number"),
        (["--dp-noise", "1", "--dp-epsilon", "8"], "not allowed with argument"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--out", "x", *argv])

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_a_demo_the_coordinator_would_refuse_exits_2_with_one_line(
    tmp_path: Path, lab_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--out", str(tmp_path / "demo"), "--model-size", "tiny", "--cache-dir", str(lab_cache)]

    code = main([*argv, "--mode", "full", "--aggregation", "ffa"])

    err = capsys.readouterr().err
    assert code == 2
    assert "run.yaml aggregation: ffa applies to LoRA adapters" in err
    assert err.strip().splitlines()[-1].startswith("fedlora-lab demo: error:")
