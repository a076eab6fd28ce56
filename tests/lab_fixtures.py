"""Session-wide lab artifacts shared by the integration and end-to-end tests: built once per run."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedlora_lab.cli import main
from fedlora_lab.model_factory import LabModelConfig, MadeModel, cached_model

SMALL_EXPERIMENT: dict[str, Any] = {
    "name": "small",
    "model": {"lab": "tiny"},
    "data": {"n_train": 6, "n_eval": 3, "n_canaries": 4, "frac_10x": 0.5, "n_controls": 2},
    "federation": {"sites": 2, "rounds": 1, "local_steps": 2, "batch_size": 2, "max_seq_len": 64},
    "seeds": [0],
    "parallel": 2,
    "audit": {"prefixes": [10], "candidates": 8},
    "methods": [
        {"name": "full", "mode": "full", "learning_rate": 1e-3},
        {"name": "lora", "mode": "lora", "learning_rate": 3e-3, "lora": {"rank": 4, "alpha": 8}},
    ],
}
"""The smallest experiment that still compares two methods: the tiny model, two sites, one round of two steps."""


@dataclass(frozen=True)
class ExperimentRun:
    """What one `fedlora-lab experiment` left: its exit code, what it wrote to stderr, its output directory."""

    code: int
    stderr: str
    out: Path


@pytest.fixture(scope="session")
def lab_model(tmp_path_factory: pytest.TempPathFactory) -> MadeModel:
    """The tiny lab base model (tokenizer trained locally, briefly pre-trained), cached for the session."""
    return cached_model(tmp_path_factory.mktemp("lab-cache"), LabModelConfig.tiny())


@pytest.fixture(scope="session")
def lab_cache(lab_model: MadeModel) -> Path:
    """A cache directory that already holds the tiny lab model, for `fedlora-lab demo --cache-dir`."""
    return lab_model.path.parent


@pytest.fixture(scope="session")
def small_experiment(tmp_path_factory: pytest.TempPathFactory, lab_cache: Path) -> ExperimentRun:
    """SMALL_EXPERIMENT run once by `fedlora-lab experiment` on the local executor: the end-to-end test reads
    what it left, and a test that runs the same grid elsewhere (on Ray) compares its cells with it, so the
    suite pays for this grid once."""
    work = tmp_path_factory.mktemp("small-experiment")
    config = work / "experiment.yaml"
    config.write_text(yaml.safe_dump(SMALL_EXPERIMENT), encoding="utf-8")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["experiment", "--config", str(config), "--out", str(work / "out"), "--cache-dir", str(lab_cache)])
    return ExperimentRun(code, stderr.getvalue(), work / "out")
