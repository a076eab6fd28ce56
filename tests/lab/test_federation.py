"""A local federation's configs are the programs' own settings models, dumped: they load back as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fedlora_common.settings import load_settings
from fedlora_lab.datagen import DataSpec
from fedlora_lab.federation import FederationPlan, LocalFederation
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings


def _plan(tmp_path: Path, **run: object) -> FederationPlan:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}", encoding="utf-8")
    return FederationPlan(
        out_dir=tmp_path / "out",
        base_model=base,
        rounds=2,
        data=DataSpec(n_train=2, n_eval=1, n_canaries=1, n_controls=1),
        run=run,
    )


def test_run_yaml_holds_only_what_differs_from_the_defaults_and_loads_back(tmp_path: Path) -> None:
    plan = _plan(tmp_path, training={"local_steps": 4}, privacy={"goldfish": {"k": 4, "h": 13}})

    run_yaml, workers = LocalFederation(plan).prepare()

    written = yaml.safe_load(run_yaml.read_text(encoding="utf-8"))
    loaded = load_settings(RunSettings, ["--config", str(run_yaml)], environ={})
    assert "config_version" not in written
    assert written["training"] == {"local_steps": 4}
    assert loaded.rounds == 2
    assert loaded.training.local_steps == 4
    assert loaded.privacy.goldfish is not None
    assert loaded.privacy.goldfish.k == 4
    assert loaded.listen.port == 0
    assert [w.id for w in loaded.workers] == ["clinical", "legal", "finance"]
    assert all(w.identity_public is not None for w in loaded.workers)
    assert sorted(path.parent.name for path in workers) == ["clinical", "finance", "legal"]


def test_worker_settings_dump_and_load_back_unchanged(tmp_path: Path) -> None:
    _, workers = LocalFederation(_plan(tmp_path)).prepare()

    for path, settings in workers.items():
        dumped = settings.model_dump(mode="json", exclude_defaults=True)

        assert WorkerSettings.model_validate(dumped) == settings
        assert settings.data.canaries == (path.parent / "canaries.jsonl", path.parent / "controls.jsonl")
        assert settings.bearer_token()


def test_a_setting_the_coordinator_would_refuse_is_refused_before_anything_starts(tmp_path: Path) -> None:
    plan = _plan(tmp_path, training={"epochs": 3})

    with pytest.raises(ValidationError, match="epochs"):
        LocalFederation(plan).prepare()

    assert not (tmp_path / "out" / "run.yaml").exists()
