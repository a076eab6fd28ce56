"""Synthetic site data: determinism, canary bookkeeping, and what must never leak where."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedlora_lab.datagen import (
    DOMAINS,
    DataSpec,
    Domain,
    SiteData,
    generate_site,
    pretraining_corpus,
    write_site,
)

SPEC = DataSpec(n_train=60, n_eval=12, n_canaries=10, n_controls=6, frac_10x=0.3, seed=7)


@pytest.fixture(scope="module", params=DOMAINS)
def site(request: pytest.FixtureRequest) -> SiteData:
    domain: Domain = request.param
    return generate_site(domain, SPEC)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretraining_corpus(300, seed=SPEC.seed)


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(site: SiteData) -> list[str]:
    return [r["text"] for r in (*site.train, *site.eval)] + [c["text"] for c in (*site.canaries, *site.controls)]


def test_generate_site_is_deterministic_for_a_seed(site: SiteData) -> None:
    again = generate_site(site.domain, SPEC)

    assert again == site


def test_generate_site_differs_across_seeds(site: SiteData) -> None:
    other = generate_site(site.domain, DataSpec(n_train=60, n_eval=12, n_canaries=10, n_controls=6, seed=8))

    assert not {r["text"] for r in other.train} & {r["text"] for r in site.train}
    assert [c["secrets"] for c in other.canaries] != [c["secrets"] for c in site.canaries]


def test_every_domain_gives_records_of_a_few_hundred_words(site: SiteData) -> None:
    words = [len(text.split()) for text in _texts(site)]

    assert len(site.train) == SPEC.n_train
    assert len(site.eval) == SPEC.n_eval
    assert min(words) >= 150
    assert max(words) <= 400


def test_records_are_all_distinct(site: SiteData) -> None:
    texts = _texts(site)

    assert len(set(texts)) == len(texts)


def test_canaries_are_split_into_10x_and_1x_groups(site: SiteData) -> None:
    groups = Counter((c["group"], c["duplicates"]) for c in site.canaries)

    assert groups == {("10x", 10): SPEC.n_10x, ("1x", 1): SPEC.n_canaries - SPEC.n_10x}
    assert {(c["group"], c["duplicates"]) for c in site.controls} == {("control", 0)}


def test_each_secret_appears_in_its_own_record_only(site: SiteData) -> None:
    others = [r["text"] for r in (*site.train, *site.eval)]

    for canary in (*site.canaries, *site.controls):
        assert set(canary["secrets"]) == {"name", "record_id", "phone", "dob"}
        for value in canary["secrets"].values():
            assert value in canary["text"]
            assert not any(value in text for text in others), (canary["id"], value)


def test_write_site_repeats_each_canary_by_its_duplication_count(site: SiteData, tmp_path: Path) -> None:
    paths = write_site(tmp_path, site)

    lines = _read_jsonl(paths.train)
    counts = Counter(line["text"] for line in lines)
    assert all(set(line) == {"text"} for line in lines)
    assert len(lines) == SPEC.n_train + sum(c["duplicates"] for c in site.canaries)
    assert all(counts[c["text"]] == c["duplicates"] for c in site.canaries)
    assert all(counts[r["text"]] == 1 for r in site.train)
    canary_lines = sum(counts[c["text"]] for c in site.canaries)
    assert SPEC.canary_share == pytest.approx(canary_lines / len(lines))  # what the experiment's protocol bounds


def test_write_site_never_puts_controls_or_eval_records_in_train(site: SiteData, tmp_path: Path) -> None:
    paths = write_site(tmp_path, site)

    train = paths.train.read_text(encoding="utf-8")
    train_texts = {str(line["text"]) for line in _read_jsonl(paths.train)}
    for control in _read_jsonl(paths.controls):
        assert control["text"] not in train_texts
        assert isinstance(control["secrets"], dict)
        assert not any(json.dumps(value)[1:-1] in train for value in control["secrets"].values())
    assert not train_texts & {str(line["text"]) for line in _read_jsonl(paths.eval)}


def test_write_site_shuffles_train_lines(site: SiteData, tmp_path: Path) -> None:
    paths = write_site(tmp_path, site)

    texts = [line["text"] for line in _read_jsonl(paths.train)]
    assert texts[: SPEC.n_train] != [r["text"] for r in site.train]


def test_write_site_records_canaries_controls_and_manifest(site: SiteData, tmp_path: Path) -> None:
    paths = write_site(tmp_path, site)

    canaries = _read_jsonl(paths.canaries)
    manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
    assert canaries == [dict(c) for c in site.canaries]
    assert _read_jsonl(paths.controls) == [dict(c) for c in site.controls]
    assert len(_read_jsonl(paths.eval)) == SPEC.n_eval
    assert manifest["domain"] == site.domain
    assert manifest["seed"] == SPEC.seed
    assert manifest["counts"]["canaries_10x"] == SPEC.n_10x
    assert manifest["counts"]["train_lines"] == len(_read_jsonl(paths.train))
    assert not list(tmp_path.glob(".*.tmp"))


def test_pretraining_corpus_never_contains_a_canary_or_control_secret(site: SiteData, corpus: list[str]) -> None:
    text = "\n".join(corpus)

    for canary in (*site.canaries, *site.controls):
        assert canary["text"] not in text
        for value in canary["secrets"].values():
            assert value not in text, (canary["id"], value)


HELD_OUT_SECTIONS = {
    "clinical": ("Social history:", "Care coordination:", "Patient education:", "Shared decision-making:"),
    "legal": ("Significance:", "Risks:", "Impeachment notes:", "Urgency:"),
    "finance": ("Documents received:", "Conditions:", "Policy exceptions:", "Borrower statement:"),
}
DOCUMENT_KINDS = {
    "clinical": ("DISCHARGE SUMMARY", "PROGRESS NOTE", "EMERGENCY DEPARTMENT PHYSICIAN NOTE", "Dear Dr."),
    "legal": ("CASE SUMMARY", "MEMORANDUM", "DEPOSITION SUMMARY", "NEW CLIENT INTAKE"),
    "finance": ("LOAN APPLICATION FILE", "UNDERWRITING MEMORANDUM", "CREDIT COMMITTEE MINUTES", "HARDSHIP AND LOSS"),
}


def test_pretraining_corpus_holds_out_the_site_only_sections(site: SiteData, corpus: list[str]) -> None:
    sites = "\n".join(r["text"] for r in site.train)

    text = "\n".join(corpus)
    assert all(marker in sites and marker not in text for marker in HELD_OUT_SECTIONS[site.domain])
    assert all(marker in sites and marker in text for marker in DOCUMENT_KINDS[site.domain])


def test_pretraining_corpus_is_deterministic_and_sized(corpus: list[str]) -> None:
    again = pretraining_corpus(300, seed=SPEC.seed)

    assert again == corpus
    assert len(corpus) == 300
    assert pretraining_corpus(20, seed=SPEC.seed + 1) != corpus[:20]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_train", 0),
        ("n_eval", -1),
        ("n_canaries", -3),
        ("n_controls", 1.5),
        ("frac_10x", 1.2),
        ("frac_10x", "0.3"),
        ("seed", -1),
    ],
)
def test_invalid_data_spec_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        DataSpec(**{field: value})  # type: ignore[arg-type]


def test_generate_site_rejects_an_unknown_domain() -> None:
    with pytest.raises(ValueError, match=r"^domain:"):
        generate_site("retail", SPEC)  # type: ignore[arg-type]
