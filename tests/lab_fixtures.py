"""Session-wide lab artifacts shared by the integration and end-to-end tests: built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora_lab.model_factory import LabModelConfig, MadeModel, cached_model


@pytest.fixture(scope="session")
def lab_model(tmp_path_factory: pytest.TempPathFactory) -> MadeModel:
    """The tiny lab base model (tokenizer trained locally, briefly pre-trained), cached for the session."""
    return cached_model(tmp_path_factory.mktemp("lab-cache"), LabModelConfig.tiny())


@pytest.fixture(scope="session")
def lab_cache(lab_model: MadeModel) -> Path:
    """A cache directory that already holds the tiny lab model, for `fedlora-lab demo --cache-dir`."""
    return lab_model.path.parent
