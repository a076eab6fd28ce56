"""Synthetic site data for the lab: ordinary records, canaries, controls, and a pre-training corpus.

Every site holds records of one domain (clinical notes, legal case files, loan files), each a few
hundred words, built from several document kinds whose sections, phrasings and values vary.
Canaries are ordinary-looking records whose person fields (name, record number, phone, date of
birth) are reported as secrets; controls are canaries that are never trained on, so the audit can
tell what the format alone predicts from what a model memorised.

Two guarantees hold by construction rather than by luck:

* Held-out material. Every document kind has one section that only site data carries (the
  ``if site:`` branches of the builders), so the lab base model knows the vocabulary and the
  formats while federated fine-tuning still has real structure to learn.
* No secret leaks into pre-training. Every person value (full names, record numbers, phones,
  dates of birth) is drawn from one of two disjoint halves of its space, split by a keyed hash:
  site data only uses the private half, the pre-training corpus only the public half. Within a
  site all person values are distinct: no two records share a name, record number, phone or birth date.

All randomness comes from per-call seeded streams, never from global state. The templates of
each domain live in ``fedlora_lab.templates``; this module assembles them into site files.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedlora_common.files import atomic_write
from fedlora_lab.templates import DOMAINS, GENERAL, STYLES, Domain, Draw, Person, derive_seed
from fedlora_worker.records import CanaryRecord, Group, TextRecord

__all__ = [
    "DOMAINS",
    "CanaryRecord",
    "DataSpec",
    "Domain",
    "Group",
    "SiteData",
    "SitePaths",
    "TextRecord",
    "generate_site",
    "pretraining_corpus",
    "write_site",
]

_FORMAT_VERSION: Final = 1
_DUPLICATES_HIGH: Final = 10


@dataclass(frozen=True)
class DataSpec:
    """How much data one site gets; ``seed`` fixes every record."""

    n_train: int = 300
    n_eval: int = 40
    n_canaries: int = 30
    n_controls: int = 20
    frac_10x: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        minimum = {"n_train": 1, "n_eval": 1, "n_canaries": 0, "n_controls": 0, "seed": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
        if isinstance(self.frac_10x, bool) or not isinstance(self.frac_10x, int | float):
            raise ValueError(f"frac_10x: must be a number in [0, 1], got {self.frac_10x!r}")
        if not 0.0 <= self.frac_10x <= 1.0:
            raise ValueError(f"frac_10x: must be in [0, 1], got {self.frac_10x!r}")

    @property
    def n_10x(self) -> int:
        """Number of canaries repeated ten times in the training file."""
        return round(self.frac_10x * self.n_canaries)

    @property
    def canary_share(self) -> float:
        """The fraction of the training file's records that are canary copies (a 10x canary counts ten times)."""
        copies = _DUPLICATES_HIGH * self.n_10x + self.n_canaries - self.n_10x
        return copies / (self.n_train + copies)


@dataclass(frozen=True)
class SiteData:
    """Everything one site holds, before it is written to disk."""

    domain: Domain
    spec: DataSpec
    train: list[TextRecord]
    eval: list[TextRecord]
    canaries: list[CanaryRecord]
    controls: list[CanaryRecord]


@dataclass(frozen=True)
class SitePaths:
    """Where ``write_site`` put each file."""

    root: Path
    train: Path
    eval: Path
    canaries: Path
    controls: Path
    manifest: Path


def _record(d: Draw, domain: Domain, *, site: bool) -> tuple[str, Person]:
    """One document of ``domain``; only site documents carry the held-out sections."""
    style = STYLES[domain]
    build = d.pick(style.kinds)
    person = d.person(style.id_prefix)
    footer = style.footer.format(signed=f"{d.full_name()} on {d.day(2019, 2024)}")
    return d.vary(f"{build(d, person, site)}\n\n{footer}"), person


def generate_site(domain: Domain, spec: DataSpec) -> SiteData:
    """Build one site's records; the same ``(domain, spec)`` always gives the same data."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: must be one of {', '.join(DOMAINS)}, got {domain!r}")
    d = Draw("site", domain, spec.seed, private=True)
    train = [TextRecord(text=_record(d, domain, site=True)[0]) for _ in range(spec.n_train)]
    held = [TextRecord(text=_record(d, domain, site=True)[0]) for _ in range(spec.n_eval)]

    def canary(name: str, i: int, group: Group, duplicates: int) -> CanaryRecord:
        text, person = _record(d, domain, site=True)
        return CanaryRecord(
            id=f"{domain}-{name}-{i:03d}", text=text, secrets=person.secrets(), duplicates=duplicates, group=group
        )

    canaries = [
        canary("canary", i, "10x", _DUPLICATES_HIGH) if i < spec.n_10x else canary("canary", i, "1x", 1)
        for i in range(spec.n_canaries)
    ]
    controls = [canary("control", i, "control", 0) for i in range(spec.n_controls)]
    return SiteData(domain, spec, train, held, canaries, controls)


def _jsonl(rows: Iterable[Mapping[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_site(out_dir: Path, data: SiteData) -> SitePaths:
    """Write a site's files; the training file mixes records and repeated canaries, shuffled by seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = SitePaths(
        root=out_dir,
        train=out_dir / "train.jsonl",
        eval=out_dir / "eval.jsonl",
        canaries=out_dir / "canaries.jsonl",
        controls=out_dir / "controls.jsonl",
        manifest=out_dir / "manifest.json",
    )
    lines = [*data.train, *(TextRecord(text=c["text"]) for c in data.canaries for _ in range(c["duplicates"]))]
    random.Random(derive_seed("shuffle", data.domain, data.spec.seed)).shuffle(lines)
    atomic_write(paths.train, _jsonl(lines))
    atomic_write(paths.eval, _jsonl(data.eval))
    atomic_write(paths.canaries, _jsonl(data.canaries))
    atomic_write(paths.controls, _jsonl(data.controls))
    manifest = {
        "format_version": _FORMAT_VERSION,
        "domain": data.domain,
        "seed": data.spec.seed,
        "spec": dataclasses.asdict(data.spec),
        "counts": {
            "train_records": len(data.train),
            "train_lines": len(lines),
            "eval": len(data.eval),
            "canaries_10x": sum(c["group"] == "10x" for c in data.canaries),
            "canaries_1x": sum(c["group"] == "1x" for c in data.canaries),
            "controls": len(data.controls),
        },
    }
    atomic_write(paths.manifest, json.dumps(manifest, indent=2) + "\n")
    return paths


def pretraining_corpus(n_docs: int, *, seed: int) -> list[str]:
    """Broad text for pre-training the lab base model, disjoint from every site's secrets.

    About 20% general prose (letters, emails, directories with addresses and phones, meeting notes,
    figures, Faker paragraphs) and 80% domain documents split evenly over clinical, legal and
    finance, in all their kinds. Held out, so that only ``generate_site`` records carry them, is
    one section per kind, about a tenth of a record's tokens: social history, care coordination,
    patient education, shared decision-making (clinical); significance, risks, impeachment notes,
    urgency (legal); documents received, conditions, policy exceptions, borrower statement
    (finance). Person values come from the public half of each value space, so no canary or
    control secret can appear here.
    """
    if n_docs < 0:
        raise ValueError(f"n_docs: must be >= 0, got {n_docs}")
    d = Draw("pretrain", seed, private=False)
    docs = []
    for _ in range(n_docs):
        if d.rng.random() < 0.2:
            docs.append(d.vary(d.pick(GENERAL)(d)))
        else:
            docs.append(_record(d, d.pick(DOMAINS), site=False)[0])
    return docs
