"""A restarted run keeps the settings it started with; what may change, an operator amends on purpose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedlora_server.pinning import ABSENT, Change, amend_refusal, changes, pinned
from tests.server.conftest import run_settings
from tests.server.statedir import files_of, one_round_committed, start_refused


def _pinned(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return pinned(run_settings(tmp_path, **overrides))


def test_only_pinned_fields_count_and_each_is_named_by_its_path(tmp_path: Path) -> None:
    stored = _pinned(tmp_path, rounds=8)

    asked = _pinned(
        tmp_path / "elsewhere",
        rounds=2,
        lora={"rank": 8},
        listen={"host": "127.0.0.1", "port": 7000, "metrics_port": None},
        timeouts={"poll_wait_ms": 500},
    )

    assert [c.line() for c in changes(stored, asked)] == ["lora.rank: 16 -> 8", "rounds: 8 -> 2"]


def test_a_stored_config_without_a_setting_a_later_release_added_reads_it_at_its_default(tmp_path: Path) -> None:
    stored = _pinned(tmp_path)
    del stored["training"]["warmup_steps"]

    assert changes(stored, _pinned(tmp_path)) == []
    assert [c.field for c in changes(stored, _pinned(tmp_path, training={"warmup_steps": 7}))] == [
        "training.warmup_steps"
    ]


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (Change("rounds", 3, 5), None),
        (Change("rounds", 3, 2), "only more may be asked"),
        (Change("min_workers", 3, 2), None),
        (Change("workers.site-d", ABSENT, {"id": "site-d"}), None),
        (Change("workers.finance", {"id": "finance"}, ABSENT), None),
        (Change("workers.finance.token_sha256", "a" * 64, "b" * 64), None),
        (Change("workers.finance.identity_public", "a" * 64, "b" * 64), None),
        (Change("workers.finance.id", "finance", "bank"), "only a site's token_sha256 and identity_public"),
        (Change("lora.rank", 16, 8), "changes what the committed rounds computed or protected"),
        (Change("secure_aggregation.enabled", True, False), "changes what the committed rounds computed"),
        (Change("seed", 0, 1), "changes what the committed rounds computed"),
    ],
)
def test_an_amendment_keeps_every_committed_round_valid(tmp_path: Path, change: Change, refused: str | None) -> None:
    reason = amend_refusal(change, _pinned(tmp_path))

    assert reason is None if refused is None else refused in (reason or "")


def test_more_rounds_are_refused_when_client_dp_solved_its_noise_for_the_rounds_first_asked(tmp_path: Path) -> None:
    stored = _pinned(tmp_path, privacy={"client_dp": {"clip_norm": 1.0, "target_epsilon": 8.0}})

    assert "target epsilon" in (amend_refusal(Change("rounds", 3, 5), stored) or "")


@pytest.mark.slow
def test_a_restart_that_would_change_the_run_is_refused_one_line_per_field_and_writes_nothing(tmp_path: Path) -> None:
    # Prepare: a run that committed round 1 of 2.
    state = tmp_path / "state"
    one_round_committed(state)
    before = files_of(state)

    # Execute: the same run.yaml, with flags a careless restart would carry.
    refused = start_refused(state, "--rounds", "1", "--lora.rank", "8", "--seed", "3")

    # Assert: exit 2, each field named with what the state holds and what was asked; not a byte changed.
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines[0].startswith("fedlora-server: state error: ")
    assert "fedlora-server amend" in lines[0]
    assert lines[1:] == ["  lora.rank: 16 -> 8", "  rounds: 2 -> 1", "  seed: 0 -> 3"]
    assert files_of(state) == before
