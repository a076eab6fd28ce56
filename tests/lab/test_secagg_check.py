"""The experiment's one-seed check that secure aggregation commits what the plain run commits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fedlora_common.secagg import quantization_step
from fedlora_lab.experiment import ExperimentConfig
from fedlora_lab.experiment.secagg_check import compare_models, quantization_bound, run_secagg_check
from fedlora_lab.model_factory import MadeModel

CONFIG: dict[str, Any] = {
    "name": "check",
    "model": {"lab": "tiny"},
    "data": {"n_train": 6, "n_eval": 3, "n_canaries": 4, "frac_10x": 0.5, "n_controls": 2},
    "federation": {"sites": 2, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_seq_len": 64},
    "seeds": [0],
    "audit": {"prefixes": [10], "candidates": 8},
    "methods": [{"name": "lora", "mode": "lora", "learning_rate": 3e-3, "lora": {"rank": 4, "alpha": 8}}],
    "secagg_check": {"method": "lora"},
}


def test_the_bound_is_n_steps_scaled_by_the_weight_the_sum_is_divided_by() -> None:
    step = quantization_step(0.05, 30)

    bound = quantization_bound(sites=3, clip_range=0.05, bits=30, max_examples=1000, examples=250)

    assert bound == pytest.approx(3 * step * 4)


def test_compare_models_reports_the_largest_difference_and_refuses_other_tensors() -> None:
    plain = {"a": np.array([1.0, -2.0], dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    secure = {"a": np.array([1.0, -2.5], dtype=np.float32), "b": np.full(3, 0.25, dtype=np.float32)}

    assert compare_models(plain, secure) == (0.5, 2.0)
    with pytest.raises(ValueError, match="different tensors"):
        compare_models(plain, {"a": plain["a"]})


@pytest.mark.parametrize(
    ("check", "message"),
    [({"method": "nope"}, "no method named 'nope'"), ({"method": "lora", "rounds": 0}, "rounds")],
)
def test_a_check_of_a_missing_method_or_no_rounds_is_refused(check: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate({**CONFIG, "secagg_check": check})


def test_a_method_already_masked_cannot_be_checked_against_itself() -> None:
    methods = [{**CONFIG["methods"][0], "secure_aggregation": True}]

    with pytest.raises(ValidationError, match="already runs with secure aggregation"):
        ExperimentConfig.model_validate({**CONFIG, "methods": methods})


def test_the_masked_run_commits_the_plain_runs_adapter_within_the_bound(tmp_path: Path, lab_model: MadeModel) -> None:
    config = ExperimentConfig.model_validate(CONFIG)

    check = run_secagg_check(config, tmp_path / "check", lab_model.path)

    assert check["rounds_compared"] == 1
    assert check["within_bound"] is True
    assert 0 <= check["max_abs_diff"] <= check["bound"] < 1e-5
    for side in ("plain", "secure"):
        report = (tmp_path / "check" / side / "report.json").read_text(encoding="utf-8")
        assert f'"secure_aggregation": {"true" if side == "secure" else "false"}' in report
