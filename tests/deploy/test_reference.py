"""docs/reference/settings.md is rendered from the settings models and committed: it must be current."""

from __future__ import annotations

import importlib.util
import re
from types import ModuleType

from fedlora_common.settings import missing_descriptions
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings
from tests.deploy.support import REPO

PAGE = REPO / "docs" / "reference" / "settings.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_reference", REPO / "docs" / "reference" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_settings_reference_is_what_make_docs_renders_now() -> None:
    rendered = _generator().render()

    assert PAGE.read_text(encoding="utf-8") == rendered, "docs/reference/settings.md is out of date: run `make docs`"


def test_every_setting_of_both_programs_has_a_description() -> None:
    assert missing_descriptions(RunSettings) == []
    assert missing_descriptions(WorkerSettings) == []


def test_the_reference_has_a_row_for_every_setting_with_its_default() -> None:
    page = PAGE.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]* \| ([^|]*) \|", page, flags=re.MULTILINE))

    assert rows["lora.rank"] == "`16`"
    assert rows["listen.tls.client_ca"] == "`null`"
    assert rows["workers[].identity_public"] == "`null`"
    assert rows["base_model"] == "**required**"
    assert rows["data.train"] == "**required**"
    assert rows["retry.attempts"] == "`8`"
    assert rows["peers"] == "`{}`"
    assert len(rows) >= 80
