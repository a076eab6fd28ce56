"""`fedlora-server --help`, `check-config` and `config-reference`: what a newcomer types first."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from fedlora_server.certs import issue_certificates
from fedlora_server.cli import main
from tests.deploy.support import BIN, REPO, run_program, sha256_hex, write_yaml

GOOD = {
    "base_model": "tiny",
    "workers": [{"id": "clinical", "token_sha256": sha256_hex("t")}],
    "min_workers": 1,
    "secure_aggregation": {"enabled": False},
}


def test_help_lists_the_commands_every_setting_as_a_flag_and_points_at_the_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--help"])

    out = capsys.readouterr().out
    assert code == 0
    for command in ("check-config run.yaml", "--check --config run.yaml", "certs --out DIR", "config-reference"):
        assert f"fedlora-server {command}" in out
    assert "docs/reference/settings.md" in out
    assert "--lora.rank" in out
    assert "--listen.tls.client_ca" in out
    assert "--timeouts.admission_s" in out


def test_no_arguments_ask_for_the_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([])

    assert code == 2
    assert capsys.readouterr().err == "fedlora-server: config error: --config FILE is required\n"


def test_a_typo_in_a_required_setting_is_named_as_the_unknown_key_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    write_yaml(config, {"base_modle": "tiny", **{k: v for k, v in GOOD.items() if k != "base_model"}})

    code = main(["--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "fedlora-server: config error: base_modle: unknown setting (did you mean base_model?); "
        "base_model: Field required\n"
    )


def test_check_config_accepts_a_valid_file_and_starts_nothing(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "run.yaml", {**GOOD, "state_dir": str(tmp_path / "state")})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    result = run_program([str(BIN / "fedlora-server"), "check-config", str(config)])

    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: run fedlora-run, 1 workers allowed (min 1), 3 rounds")
    assert not (tmp_path / "state").exists()
    assert cpu_seconds < 5.0


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rounds": 0}, "rounds: Input should be greater than or equal to 1"),
        ({"secure_aggregation": {"enabled": True}}, "workers: secure aggregation needs identity_public for clinical"),
        ({"listen": {"tls": {"cert": "missing.crt", "key": "missing.key"}}}, "listen.tls.cert: missing.crt:"),
        ({"listen": {"host": "0.0.0.0"}}, "listen: plaintext gRPC on 0.0.0.0"),
    ],
)
def test_check_config_refuses_a_bad_file_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object], named: str
) -> None:
    config = write_yaml(tmp_path / "run.yaml", {**GOOD, **changes})

    code = main(["check-config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.count("\n") == 1


def test_check_config_reads_the_tls_files_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    issue_certificates(tmp_path / "tls", workers=["clinical"])
    (tmp_path / "tls" / "ca.crt").write_text("not a certificate\n")
    tls = {"cert": "tls/coordinator.crt", "key": "tls/coordinator.key", "client_ca": "tls/ca.crt"}
    config = write_yaml(tmp_path / "run.yaml", {**GOOD, "listen": {"host": "0.0.0.0", "tls": tls}})

    refused = run_program([str(BIN / "fedlora-server"), "check-config", str(config)], cwd=tmp_path)
    issue_certificates(tmp_path / "fresh", workers=["clinical"])
    (tmp_path / "tls" / "ca.crt").write_bytes((tmp_path / "fresh" / "ca.crt").read_bytes())
    accepted = run_program([str(BIN / "fedlora-server"), "check-config", str(config)], cwd=tmp_path)

    assert refused.returncode == 2
    assert refused.stderr == "fedlora-server: config error: listen.tls.client_ca: tls/ca.crt is not a PEM file\n"
    assert accepted.returncode == 0, accepted.stderr
    assert "mutual TLS on 0.0.0.0:50051" in accepted.stdout


def test_check_config_without_a_file_says_how_to_call_it(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check-config"])

    assert code == 2
    assert "usage: fedlora-server check-config run.yaml" in capsys.readouterr().err


def test_config_reference_prints_the_run_yaml_part_of_the_committed_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["config-reference"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("## `run.yaml`")
    assert out in (REPO / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
