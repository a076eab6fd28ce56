"""Nothing of a site's records leaves it, even with the canary audit after every round.

The uninterrupted federation of processes (tests/e2e/conftest.py: three sites, secure aggregation,
every round audited) has finished; every log of every process, every report file, the coordinator's
database and every metrics page scraped from the coordinator and the workers while they ran are
searched for each canary's and control's secrets (names, record numbers, phones, birth dates) and
for each line of every training record, as written and as JSON or HTML would escape it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from tests.e2e.conftest import ReferenceRun

MIN_LINE = 20
"""Record lines shorter than this ("Dear Dr. X,", a date) could turn up by chance; longer ones cannot."""


def _needles(sites: Path) -> dict[str, str]:
    """What must never leave a site: needle -> where it comes from."""
    needles: dict[str, str] = {}
    for site in sorted(p for p in sites.iterdir() if p.is_dir()):
        for name in ("canaries.jsonl", "controls.jsonl"):
            for record in map(json.loads, (site / name).read_text().splitlines()):
                for field, secret in record["secrets"].items():
                    needles[secret] = f"{site.name} {record['id']} {field}"
        for number, line in enumerate((site / "train.jsonl").read_text().splitlines()):
            for text in json.loads(line)["text"].splitlines():
                if len(text.strip()) >= MIN_LINE:
                    needles[text.strip()] = f"{site.name} train.jsonl record {number}"
    return needles


def _forms(needle: str) -> set[str]:
    return {needle, json.dumps(needle)[1:-1], html.escape(needle), html.escape(needle, quote=False)}


def _found(needles: dict[str, str], haystacks: dict[str, str]) -> list[str]:
    return [
        f"{origin!r} in {where}"
        for needle, origin in needles.items()
        for where, text in haystacks.items()
        if any(form in text for form in _forms(needle))
    ]


@pytest.mark.slow
def test_no_secret_or_record_line_reaches_a_log_a_report_or_a_metrics_page(reference_run: ReferenceRun) -> None:
    # Prepare: the finished, audited run, and what it may have written.
    codes = reference_run.finished()
    out = reference_run.fed.out
    report = json.loads((out / "report.json").read_text())
    needles = _needles(out / "sites")
    haystacks = {str(path.relative_to(out)): path.read_text(errors="replace") for path in (out / "logs").glob("*.log")}
    for path in [*out.glob("*.json"), *out.glob("*.md"), *out.glob("*.html"), *out.glob("*.yaml")]:
        haystacks[path.name] = path.read_text(errors="replace")
    haystacks["coordinator.db"] = (out / "coordinator.db").read_bytes().decode("latin-1")
    for name, pages in reference_run.pages.items():
        for index, page in enumerate(sorted(pages)):
            haystacks[f"{name} /metrics #{index}"] = page

    # Execute
    leaks = _found(needles, haystacks)
    # The search itself works: the site's own files do hold every needle.
    site_files = {str(p.relative_to(out)): p.read_text() for p in (out / "sites").glob("*/*.jsonl")}
    unfound = set(needles) - {n for n in needles if any(any(f in t for f in _forms(n)) for t in site_files.values())}

    # Assert: a real, audited run, whose every output was searched, and nothing of the records in any of it.
    assert set(codes.values()) == {0}, codes
    assert all(r["memorization"]["by_duplication"]["10x"]["count"] > 0 for r in report["rounds"])
    assert set(reference_run.pages) == {"coordinator", "clinical", "finance", "legal"}
    assert any("fedlora_worker_memorization_exact_match_rate{" in page for page in reference_run.pages["clinical"])
    assert len(needles) > 100
    assert not unfound
    assert leaks == []
