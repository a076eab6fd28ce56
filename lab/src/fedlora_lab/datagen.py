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

All randomness comes from per-call seeded streams (``Faker.seed_instance`` and ``random.Random``),
never from global state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Final, Literal, TypeVar, get_args

from faker import Faker

from fedlora_common.files import atomic_write
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

Domain = Literal["clinical", "legal", "finance"]
DOMAINS: Final[tuple[Domain, ...]] = get_args(Domain)

_T = TypeVar("_T")
_FORMAT_VERSION: Final = 1
_DUPLICATES_HIGH: Final = 10
_ALTERNATIVES: Final = re.compile(r"\[([^\[\]|]*(?:\|[^\[\]|]*)+)\]")
_ID_PREFIX: Final[Mapping[Domain, str]] = {"clinical": "MRN", "legal": "CASE", "finance": "ACCT"}


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


# --------------------------------------------------------------------------- seeded randomness


def _derive_seed(*key: object) -> int:
    """A 64-bit seed for one named stream, so streams never share state or overlap by accident."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")


def _is_private(value: str) -> bool:
    """Which half of a value space ``value`` belongs to: private for sites, public for pre-training."""
    return hashlib.sha256(b"fedlora-lab-pii\x00" + value.encode()).digest()[0] & 1 == 1


@dataclass(frozen=True)
class _Person:
    first: str
    last: str
    female: bool
    record_id: str
    phone: str
    dob: date

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def honor(self) -> str:
        return f"{'Ms.' if self.female else 'Mr.'} {self.last}"

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def cap_subj(self) -> str:
        return self.subj.capitalize()

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"

    @property
    def cap_poss(self) -> str:
        return self.poss.capitalize()

    @property
    def obj(self) -> str:
        return "her" if self.female else "him"

    @property
    def noun(self) -> str:
        return "woman" if self.female else "man"

    def age_on(self, day: date) -> int:
        return day.year - self.dob.year - ((day.month, day.day) < (self.dob.month, self.dob.day))

    def secrets(self) -> dict[str, str]:
        return {"name": self.name, "record_id": self.record_id, "phone": self.phone, "dob": str(self.dob)}


class _Draw:
    """One seeded stream of values; person values come from one half of their space, never repeated."""

    def __init__(self, *key: object, private: bool) -> None:
        self.fake = Faker("en_US")
        self.fake.seed_instance(_derive_seed("faker", *key))
        self.rng = random.Random(_derive_seed("random", *key))
        self._private = private
        self._used: set[str] = set()

    def vary(self, text: str) -> str:
        """Replace each ``[a|b|c]`` in ``text`` by one alternative, innermost first."""
        while True:
            varied = _ALTERNATIVES.sub(lambda m: self.rng.choice(m.group(1).split("|")), text)
            if varied == text:
                return text
            text = varied

    def pick(self, options: Sequence[_T]) -> _T:
        return self.rng.choice(options)

    def several(self, options: Sequence[_T], low: int, high: int, *, ordered: bool = False) -> list[_T]:
        picked = self.rng.sample(range(len(options)), self.rng.randint(low, min(high, len(options))))
        return [options[i] for i in (sorted(picked) if ordered else picked)]

    def num(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def real(self, low: float, high: float, digits: int = 1) -> str:
        return f"{self.rng.uniform(low, high):.{digits}f}"

    def money(self, low: int, high: int, step: int = 100) -> str:
        return f"${self.rng.randrange(low, high, step):,}"

    def day(self, first_year: int, last_year: int) -> date:
        start = date(first_year, 1, 1)
        return start + timedelta(days=self.rng.randrange((date(last_year, 12, 31) - start).days))

    def _fresh(self, make: Callable[[], str]) -> str:
        while True:
            value = make()
            if _is_private(value) == self._private and value not in self._used:
                self._used.add(value)
                return value

    def full_name(self, female: bool | None = None) -> str:
        fake = self.fake
        if female is None:
            return self._fresh(lambda: f"{fake.first_name()} {fake.last_name()}")
        first = fake.first_name_female if female else fake.first_name_male
        return self._fresh(lambda: f"{first()} {fake.last_name()}")

    def phone(self) -> str:
        return self._fresh(lambda: f"({self.num(201, 989)}) {self.num(201, 989)}-{self.num(0, 9999):04d}")

    def person(self, domain: Domain) -> _Person:
        female = self.rng.random() < 0.5
        first, last = self.full_name(female).split(" ", 1)
        prefix = _ID_PREFIX[domain]
        record_id = self._fresh(lambda: f"{prefix}-{self.num(1000, 9999)}-{self.num(1000, 9999)}")
        dob = date.fromisoformat(self._fresh(lambda: str(self.day(1938, 2001))))
        return _Person(first, last, female, record_id, self.phone(), dob)


def _bullets(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _numbered(items: Iterable[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# --------------------------------------------------------------------------- clinical

_DIAGNOSES: Final = (
    ("community-acquired pneumonia", "J18.9"),
    ("acute exacerbation of chronic obstructive pulmonary disease", "J44.1"),
    ("acute on chronic systolic heart failure", "I50.23"),
    ("type 2 diabetes mellitus with hyperglycemia", "E11.65"),
    ("acute kidney injury", "N17.9"),
    ("cellulitis of the left lower extremity", "L03.116"),
    ("urinary tract infection", "N39.0"),
    ("atrial fibrillation with rapid ventricular response", "I48.91"),
    ("non-ST elevation myocardial infarction", "I21.4"),
    ("acute pancreatitis", "K85.90"),
    ("acute diverticulitis", "K57.92"),
    ("deep vein thrombosis of the right leg", "I82.401"),
    ("pulmonary embolism", "I26.99"),
    ("asthma exacerbation", "J45.901"),
    ("hypertensive urgency", "I16.0"),
    ("syncope", "R55"),
    ("upper gastrointestinal bleeding", "K92.2"),
    ("sepsis from a urinary source", "A41.9"),
    ("acute cholecystitis", "K81.0"),
    ("symptomatic hyponatremia", "E87.1"),
    ("transient ischemic attack", "G45.9"),
    ("small bowel obstruction", "K56.609"),
)
_HISTORY: Final = (
    "hypertension",
    "hyperlipidemia",
    "type 2 diabetes",
    "chronic kidney disease stage 3",
    "coronary artery disease",
    "obstructive sleep apnea",
    "hypothyroidism",
    "osteoarthritis",
    "depression",
    "gastroesophageal reflux disease",
    "prior stroke",
    "atrial fibrillation",
    "asthma",
    "obesity",
)
_MEDICATIONS: Final = (
    "metformin 500 mg twice daily",
    "lisinopril 10 mg daily",
    "atorvastatin 40 mg at bedtime",
    "apixaban 5 mg twice daily",
    "metoprolol succinate 25 mg daily",
    "furosemide 40 mg daily",
    "amoxicillin-clavulanate 875 mg twice daily for 7 days",
    "prednisone 40 mg daily for 5 days",
    "albuterol inhaler 2 puffs every 4 hours as needed",
    "insulin glargine 18 units at bedtime",
    "pantoprazole 40 mg daily",
    "levothyroxine 75 mcg daily",
    "sertraline 50 mg daily",
    "amlodipine 5 mg daily",
    "acetaminophen 650 mg every 6 hours as needed",
    "ondansetron 4 mg every 8 hours as needed",
    "tamsulosin 0.4 mg daily",
    "gabapentin 300 mg three times daily",
    "aspirin 81 mg daily",
    "clopidogrel 75 mg daily",
    "spironolactone 25 mg daily",
    "doxycycline 100 mg twice daily for 10 days",
    "cephalexin 500 mg four times daily for 7 days",
    "empagliflozin 10 mg daily",
)
_ALLERGIES: Final = (
    "no known drug allergies",
    "penicillin (rash)",
    "sulfa drugs (hives)",
    "codeine (nausea)",
    "iodinated contrast (itching)",
    "latex (contact dermatitis)",
)
_SYMPTOMS: Final = (
    "shortness of breath",
    "chest pain",
    "productive cough",
    "fever and chills",
    "abdominal pain",
    "nausea and vomiting",
    "dizziness",
    "leg swelling",
    "fatigue",
    "headache",
    "palpitations",
    "painful urination",
    "confusion",
    "low back pain",
    "poor appetite",
)
_SPECIALTIES: Final = (
    "cardiology",
    "pulmonology",
    "nephrology",
    "endocrinology",
    "gastroenterology",
    "infectious disease",
    "neurology",
    "general surgery",
)
_DURATION: Final = "[several hours|one day|two days|three days|five days|one week|two weeks]"
_HOSPITAL: Final = "[Memorial Hospital|Regional Medical Center|Community Hospital|University Hospital]"


def _labs(d: _Draw) -> str:
    results = (
        f"white blood cell count {d.real(4.0, 18.5)} K/uL",
        f"hemoglobin {d.real(8.5, 15.5)} g/dL",
        f"platelets {d.num(110, 420)} K/uL",
        f"sodium {d.num(126, 145)} mmol/L",
        f"potassium {d.real(3.1, 5.6)} mmol/L",
        f"creatinine {d.real(0.6, 3.4, 2)} mg/dL",
        f"glucose {d.num(80, 390)} mg/dL",
        f"troponin {d.real(0.01, 0.9, 2)} ng/mL",
        f"lactate {d.real(0.8, 4.2)} mmol/L",
        f"BNP {d.num(40, 2400)} pg/mL",
    )
    return _join(d.several(results, 3, 5))


def _vitals(d: _Draw) -> str:
    return (
        f"blood pressure {d.num(96, 182)}/{d.num(54, 104)}, heart rate {d.num(58, 128)}, "
        f"respiratory rate {d.num(12, 26)}, temperature {d.real(36.2, 39.4)} C, "
        f"oxygen saturation {d.num(86, 99)}% on [room air|2 L nasal cannula|4 L nasal cannula]"
    )


_EXAM: Final = (
    "[alert and oriented, in no acute distress|tired-appearing but conversant|mildly dyspneic]; "
    "[lungs clear to auscultation|crackles at the right base|diffuse expiratory wheezes]; "
    "[regular rate and rhythm|irregularly irregular rhythm|a soft systolic murmur]; "
    "[abdomen soft and nontender|tenderness in the right upper quadrant|mild epigastric tenderness]; "
    "[no peripheral edema|trace bilateral ankle edema|2+ pitting edema to the knees]"
)


def _hpi(d: _Draw, p: _Person, seen: date, history: Sequence[str]) -> str:
    symptoms = d.several(_SYMPTOMS, 2, 3)
    onset = d.pick(
        (
            "Symptoms began gradually and worsened despite rest at home.",
            f"{p.cap_subj} first noticed the {symptoms[0]} after a recent upper respiratory illness.",
            f"{p.cap_poss} family reports that {p.subj} has been less active than usual.",
            f"{p.cap_subj} tried over-the-counter remedies without relief.",
        )
    )
    return (
        f"{p.honor} is a {p.age_on(seen)}-year-old {p.noun} with a history of {_join(history)} who presents "
        f"with {_DURATION} of {_join(symptoms)}. {onset} "
        f"{p.cap_subj} denies [recent travel|sick contacts|new medications]."
    )


def _course(d: _Draw, p: _Person, diagnosis: str, meds: Sequence[str]) -> str:
    sentences = (
        f"{p.cap_subj} was treated for {diagnosis} with {meds[0].split(' ')[0]} and supportive care, "
        f"with steady improvement over the following {d.num(2, 5)} days.",
        f"{d.pick(_SPECIALTIES).capitalize()} was consulted and recommended "
        "[continued medical management|outpatient follow-up|a repeat echocardiogram].",
        f"Repeat laboratory studies on hospital day {d.num(2, 4)} showed {_labs(d)}.",
        f"{p.cap_subj} remained hemodynamically stable and tolerated a regular diet by day {d.num(2, 4)}.",
        f"Physical therapy evaluated {p.obj} and cleared {p.obj} for discharge "
        "[home without services|home with home health|to a skilled nursing facility].",
    )
    return " ".join(d.several(sentences, 3, 5, ordered=True))


def _clinical_discharge(d: _Draw, p: _Person, site: bool) -> str:
    (dx, icd), (dx2, _) = d.several(_DIAGNOSES, 2, 2)
    admitted = d.day(2019, 2024)
    meds = d.several(_MEDICATIONS, 3, 6)
    parts = [
        f"DISCHARGE SUMMARY\n{d.fake.last_name()} {_HOSPITAL}",
        f"Patient: {p.name}  MRN: {p.record_id}  DOB: {p.dob}  Phone: {p.phone}\n"
        f"Admitted: {admitted}  Discharged: {admitted + timedelta(days=d.num(2, 9))}  "
        f"Attending: Dr. {d.full_name()}",
        f"Principal diagnosis: {dx} ({icd}). Secondary diagnosis: {dx2}.",
        f"History of present illness: {_hpi(d, p, admitted, d.several(_HISTORY, 1, 3))}",
        f"Hospital course: {_course(d, p, dx, meds)}",
        f"Discharge medications:\n{_bullets(meds)}\nAllergies: {d.pick(_ALLERGIES)}.",
    ]
    if site:
        parts.append(
            f"Social history: {p.cap_subj} lives [alone in an apartment|with a spouse|with an adult daughter|"
            "in assisted living], [never smoked|quit smoking ten years ago|smokes half a pack per day], "
            "and [drinks alcohol rarely|does not drink alcohol|drinks two beers daily]."
        )
    parts.append(
        f"Follow-up: {d.pick(('primary care', *_SPECIALTIES))} clinic in {d.num(3, 14)} days. "
        f"Return for {d.pick(_SYMPTOMS)} or any new concern."
    )
    return "\n\n".join(parts)


def _clinical_progress(d: _Draw, p: _Person, site: bool) -> str:
    (dx, _), (dx2, _) = d.several(_DIAGNOSES, 2, 2)
    seen = d.day(2019, 2024)
    meds = d.several(_MEDICATIONS, 2, 3)
    plan = (
        f"{dx.capitalize()}: continue {meds[0]}; "
        "[repeat labs in the morning|monitor daily weights|wean oxygen as tolerated].",
        f"{dx2.capitalize()}: continue {meds[1]}; [recheck tomorrow|outpatient follow-up].",
        "Prophylaxis: [enoxaparin|heparin|sequential compression devices].",
        f"Disposition: anticipate discharge in {d.num(1, 4)} days.",
    )
    parts = [
        f"PROGRESS NOTE - Hospital day {d.num(2, 8)}\n"
        f"Patient: {p.name} | MRN: {p.record_id} | DOB: {p.dob} | Phone: {p.phone}\n"
        f"Date: {seen} | Author: Dr. {d.full_name()}, {d.pick(_SPECIALTIES)}",
        f"Subjective: {p.honor} reports [less|more|unchanged] {d.pick(_SYMPTOMS)} overnight. "
        f"{p.cap_subj} slept [well|poorly|a few hours] and "
        "[is eating most of each meal|has a poor appetite|tolerated breakfast]. "
        f"Denies {_join(d.several(_SYMPTOMS, 2, 3))}.",
        f"Objective: Vitals: {_vitals(d)}. Exam: {_EXAM}. Labs: {_labs(d)}.",
        f"Assessment: {p.age_on(seen)}-year-old {p.noun} with {dx}, "
        f"[improving|stable|slowly improving|not yet improving], and {dx2}.",
    ]
    if site:
        parts.append(
            "Care coordination: case management [confirmed insurance coverage for|is arranging|has ordered] "
            "[home oxygen|a rolling walker|home infusion|outpatient rehabilitation]; "
            f"{p.poss} [son|daughter|spouse|neighbor] will provide transport."
        )
    parts.append("Plan:\n" + _numbered(plan))
    return "\n\n".join(parts)


def _clinical_emergency(d: _Draw, p: _Person, site: bool) -> str:
    diagnoses = [dx for dx, _ in d.several(_DIAGNOSES, 3, 3)]
    arrived = d.day(2019, 2024)
    complaint = d.pick(_SYMPTOMS)
    parts = [
        "EMERGENCY DEPARTMENT PHYSICIAN NOTE\n"
        f"Arrival: {arrived} {d.num(0, 23):02d}:{d.num(0, 59):02d} by [ambulance|private vehicle|walk-in]  "
        f"Triage acuity: ESI {d.num(2, 4)}",
        f"Name: {p.name}  MRN: {p.record_id}  DOB: {p.dob}  Callback number: {p.phone}",
        f'Chief complaint: "{complaint}"',
        f"HPI: {_hpi(d, p, arrived, d.several(_HISTORY, 1, 2))}",
        f"Review of systems: positive for {complaint} and {d.pick(_SYMPTOMS)}; "
        "all other systems reviewed and negative.",
        f"Physical exam: {_vitals(d)}. General: {_EXAM}.",
        f"ED course and medical decision making: the differential diagnosis included {_join(diagnoses)}. "
        f"Workup showed {_labs(d)}. {p.cap_subj} received "
        "[1 L of normal saline|IV ceftriaxone|a nebulized bronchodilator|IV morphine 4 mg] "
        "and on reassessment reported [improvement|partial relief|no change].",
        "Disposition: [admitted to medicine|admitted to telemetry|discharged home] "
        f"with a diagnosis of {diagnoses[0]}.",
    ]
    if site:
        parts.insert(
            -1,
            "Patient education: [discussed warning signs|reviewed the medication changes|gave written instructions] "
            "with the patient and [a family member|the caregiver|no one else present]; "
            f"[understanding was confirmed by teach-back|all questions were answered]. Work note for {d.num(1, 5)} days.",
        )
    return "\n\n".join(parts)


def _clinical_consult(d: _Draw, p: _Person, site: bool) -> str:
    dx, icd = d.pick(_DIAGNOSES)
    specialty = d.pick(_SPECIALTIES)
    seen = d.day(2019, 2024)
    meds = d.several(_MEDICATIONS, 2, 3)
    recommendations = (
        f"Start {meds[0]}.",
        f"Continue {meds[1]} and review at the next visit.",
        "Obtain [an echocardiogram|a CT scan of the chest|pulmonary function tests|an MRI] before the follow-up visit.",
        f"Repeat [a basic metabolic panel|a complete blood count|a hemoglobin A1c] in {d.num(2, 6)} weeks.",
        f"Follow up in our clinic in {d.num(4, 12)} weeks, sooner if {p.poss} symptoms worsen.",
    )
    parts = [
        f"{d.fake.last_name()} {_HOSPITAL} - Department of {specialty.title()}\n{seen}",
        f"Re: {p.name}, DOB {p.dob}, MRN {p.record_id}, telephone {p.phone}",
        f"Dear Dr. {d.full_name()},",
        f"Thank you for asking me to see {p.honor}, a {p.age_on(seen)}-year-old {p.noun} whom I evaluated "
        f"today in the {specialty} clinic regarding {dx}. {p.cap_subj} describes "
        f"{_DURATION} of {_join(d.several(_SYMPTOMS, 1, 2))}. On examination {_EXAM}. "
        f"Recent results include {_labs(d)}.",
        f"Impression: {dx} ({icd}), [likely|probably|most consistent with] "
        "[a new diagnosis|a progression of known disease|a medication side effect].",
        "Recommendations:\n" + _numbered(d.several(recommendations, 3, 5)),
        f"I have asked {p.honor} to call our office with any questions. Thank you for involving me in {p.poss} care.",
        f"Sincerely,\nDr. {d.full_name()}, MD\n{specialty.title()}",
    ]
    if site:
        parts.insert(
            -1,
            "Shared decision-making: we discussed [the risks and benefits of|the alternatives to|the expected course of] "
            f"[treatment|the procedure|watchful waiting], and {p.subj} [prefers to start now|"
            "would like time to consider the options|agreed with the plan as outlined].",
        )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- legal


@dataclass(frozen=True)
class _Matter:
    claims: tuple[str, ...]
    statutes: tuple[str, ...]
    facts: Callable[[_Draw, _Person, str], str]


def _facts_employment(d: _Draw, p: _Person, company: str) -> str:
    start = d.num(2008, 2018)
    return (
        f"{p.name} worked for {company} as a {d.fake.job().lower()} from {start} until {start + d.num(2, 6)}, "
        f"when {p.subj} was terminated [after reporting safety violations|following medical leave|"
        "after a dispute over overtime pay|shortly after turning sixty]. "
        f"{company} contends the termination was based on "
        "[poor performance reviews|a reduction in force|attendance problems]."
    )


def _facts_injury(d: _Draw, p: _Person, company: str) -> str:
    return (
        f"On {d.day(2016, 2023)}, {p.name} [slipped on|tripped over|was struck by] "
        "[a wet floor|an unsecured display|a falling shelf|a loose handrail] at a "
        f"[grocery store|warehouse|parking garage|hotel] operated by {company} and suffered "
        "[a fractured wrist|a herniated disc|a traumatic brain injury|a torn rotator cuff]. "
        f"Medical expenses to date exceed {d.money(18_000, 240_000, 500)}."
    )


def _facts_contract(d: _Draw, p: _Person, company: str) -> str:
    return (
        f"On {d.day(2014, 2022)}, {p.name} and {company} entered into a "
        "[supply agreement|services agreement|commercial lease|software license] under which "
        f"{company} agreed to [deliver equipment|provide consulting services|build out a retail space|"
        f"host a data platform] for {d.money(40_000, 2_000_000, 1000)}. {company} "
        "[failed to deliver on schedule|stopped performing after the second payment|"
        "delivered nonconforming goods]."
    )


def _facts_consumer(d: _Draw, p: _Person, company: str) -> str:
    return (
        f"{company} [called|sent letters to|reported a disputed balance about] {p.name} "
        "[repeatedly over several months|after the debt was discharged in bankruptcy|"
        f"despite written requests to stop] concerning an alleged balance of {d.money(900, 24_000, 50)}. "
        f"{p.name} disputes owing the amount and reports "
        "[emotional distress|a damaged credit score|lost time from work]."
    )


_MATTERS: Final = (
    _Matter(
        ("wrongful termination", "age discrimination", "retaliation", "unpaid overtime"),
        (
            "Title VII of the Civil Rights Act of 1964, 42 U.S.C. § 2000e",
            "the Age Discrimination in Employment Act, 29 U.S.C. § 621",
            "the Fair Labor Standards Act, 29 U.S.C. § 201 et seq.",
            "the Family and Medical Leave Act, 29 U.S.C. § 2601",
        ),
        _facts_employment,
    ),
    _Matter(
        ("negligence", "premises liability", "product liability"),
        ("Fla. Stat. § 768.81", "Cal. Civ. Code § 1714", "the Restatement (Second) of Torts § 343"),
        _facts_injury,
    ),
    _Matter(
        ("breach of contract", "breach of the implied covenant of good faith", "fraudulent misrepresentation"),
        ("the Uniform Commercial Code § 2-207", "N.Y. Gen. Oblig. Law § 5-701", "Tex. Bus. & Com. Code § 2.725"),
        _facts_contract,
    ),
    _Matter(
        ("violation of the Fair Debt Collection Practices Act", "defamation", "unfair business practices"),
        ("15 U.S.C. § 1692", "15 U.S.C. § 1681s-2", "N.Y. Gen. Bus. Law § 349", "Cal. Bus. & Prof. Code § 17200"),
        _facts_consumer,
    ),
)
_COURTS: Final = (
    "the United States District Court for the Southern District of New York",
    "the Superior Court of California, County of Los Angeles",
    "the Circuit Court of Cook County, Illinois",
    "the District Court of Harris County, Texas",
    "the United States District Court for the District of Massachusetts",
    "the Delaware Court of Chancery",
    "the United States Court of Appeals for the Ninth Circuit",
)
_EVIDENCE: Final = (
    "emails between the parties",
    "surveillance video",
    "the signed agreement",
    "payroll and timekeeping records",
    "medical records",
    "an expert damages report",
    "text messages",
    "internal incident reports",
)
_MOTION: Final = (
    "[a motion to dismiss under Fed. R. Civ. P. 12(b)(6)|a motion for summary judgment under Fed. R. Civ. P. 56|"
    "a motion to compel arbitration|a motion to transfer venue under 28 U.S.C. § 1404(a)]"
)
_OUTCOME: Final = (
    "[granted the motion in part and denied it in part|denied the motion in its entirety|"
    "granted the motion and dismissed the claims without prejudice|affirmed the judgment below|"
    "reversed and remanded for further proceedings]"
)


def _legal_setup(d: _Draw) -> tuple[_Matter, str, list[str], str]:
    matter = d.pick(_MATTERS)
    return matter, d.fake.company(), d.several(matter.claims, 1, 2), d.pick(matter.statutes)


def _legal_case_summary(d: _Draw, p: _Person, site: bool) -> str:
    matter, company, claims, statute = _legal_setup(d)
    filed = d.day(2015, 2024)
    parts = [
        f"CASE SUMMARY\nMatter: {p.name} v. {company}\nCase No.: {p.record_id}\n"
        f"Court: {d.pick(_COURTS)}\nFiled: {filed}  Assigned judge: Hon. {d.full_name()}",
        f"Client: {p.name} (DOB {p.dob}), plaintiff. Client phone: {p.phone}.",
        f"Background: {matter.facts(d, p, company)}",
        f"Claims: The complaint asserts {_join(claims)} under {statute} and seeks "
        "[compensatory damages|back pay and reinstatement|damages and injunctive relief] "
        f"of at least {d.money(50_000, 3_000_000, 5000)}.",
        f"Procedural history: {company} filed {_MOTION}, arguing that [the claims are time-barred|"
        "the complaint fails to state a claim|the parties agreed to arbitrate|"
        f"no genuine dispute of material fact exists]. {p.honor} opposed the motion and submitted "
        "[declarations|deposition excerpts|expert reports].",
        f"Key evidence: The record includes {_join(d.several(_EVIDENCE, 2, 3))}. {d.full_name()}, a former "
        f"[manager|coworker|customer|contractor], [testified that {company} knew of the problem for months|"
        f"gave a declaration supporting {p.honor}'s account|could not confirm the timeline in the complaint].",
        f"Outcome: On {filed + timedelta(days=d.num(120, 700))}, the court {_OUTCOME}. "
        f"[The parties later settled for {d.money(25_000, 900_000, 5000)}.|Trial is scheduled for the next term.|"
        f"{company} has filed a notice of appeal.|Discovery on the remaining claims is ongoing.]",
    ]
    if site:
        parts.append(
            "Significance: The ruling [clarifies the pleading standard for|narrows the available remedies for|"
            f"is often cited on] {claims[0]} claims and should be considered in "
            "[settlement valuation|future motion practice|client counseling]."
        )
    return "\n\n".join(parts)


def _legal_memo(d: _Draw, p: _Person, site: bool) -> str:
    matter, company, claims, statute = _legal_setup(d)
    parts = [
        f"MEMORANDUM\nTO: {d.full_name()}, Partner\nFROM: {d.full_name()}, Associate\nDATE: {d.day(2018, 2024)}\n"
        f"RE: {p.name} v. {company}, {p.record_id}\nClient contact: {p.phone}, DOB {p.dob}",
        f"Question presented: Whether {p.honor} can establish {claims[0]} under {statute} on the facts below.",
        "Brief answer: [Probably yes.|Likely not.|Yes, if the record supports it.|Uncertain.] "
        "The strongest evidence is [the documentary record|the timing of the events|"
        "testimony from former colleagues|the written agreement itself].",
        f"Facts: {matter.facts(d, p, company)}",
        "Analysis: To prevail, a plaintiff must show [a duty, a breach, causation and damages|"
        "a protected activity, an adverse action and a causal link|"
        f"a valid contract, performance, breach and damages]. Courts in {d.pick(_COURTS)} have "
        "[applied this test strictly|read these elements broadly|split on the second element]. "
        f"{company} will likely argue [lack of causation|a legitimate business reason|waiver|failure to mitigate]. "
        f"We can respond with {_join(d.several(_EVIDENCE, 1, 2))}, which "
        "[undercuts that position|shows the timeline clearly|corroborates the client].",
    ]
    if site:
        parts.append(
            "Risks: [A statute of limitations defense|An arbitration clause|A signed release] may limit "
            f"recovery, and the estimated cost through trial is {d.money(60_000, 400_000, 5000)}."
        )
    parts.append(
        "Recommendation: [Proceed with the complaint|Send a demand letter first|Explore early mediation] "
        "and preserve all [emails|text messages|payroll records|invoices]."
    )
    return "\n\n".join(parts)


def _legal_deposition(d: _Draw, p: _Person, site: bool) -> str:
    _, company, claims, _ = _legal_setup(d)
    topics = (
        f"{p.poss} education and employment history",
        f"{p.poss} first contact with {company}",
        "the events described in the complaint",
        f"documents {p.subj} exchanged with {company}",
        f"{p.poss} damages and medical treatment",
        f"communications with {company} after the dispute began",
    )
    page, lines = d.num(4, 9), []
    for topic in d.several(topics, 3, 4):
        span = d.num(4, 9)
        lines.append(
            f"Pages {page}-{page + span}: The witness testified about {topic}. {p.cap_subj} "
            f"[could not recall specific dates|identified {d.full_name()} as a key witness|"
            f"stated that no written notes were kept|confirmed the account given in {p.poss} interrogatory answers]."
        )
        page += span + 1
    parts = [
        f"DEPOSITION SUMMARY\nDeponent: {p.name} (DOB {p.dob}, telephone {p.phone})\n"
        f"Matter: {p.name} v. {company}, {p.record_id}",
        f"Taken on {d.day(2018, 2024)} at the offices of {d.fake.last_name()} & {d.fake.last_name()} LLP, "
        f"{d.fake.city()}. Examining attorney: {d.full_name()}. Defending attorney: {d.full_name()}.",
        "\n".join(lines),
        f"Exhibits marked: Exhibit {d.num(1, 9)} ([the agreement|an email chain|a photograph]) "
        f"and Exhibit {d.num(10, 19)} ([payroll records|medical bills|a text message]).",
        "Objections: Defending counsel objected [to form several times|on privilege grounds twice|"
        "once to a compound question]; [no instruction not to answer was given|"
        f"the witness was instructed not to answer once]. The deposition lasted {d.num(2, 7)} hours.",
        "Assessment: The witness was [credible and consistent|evasive on damages|well prepared]; "
        f"testimony supports the {claims[0]} claim. Follow-up: [order the transcript on an expedited basis|"
        "prepare an errata sheet|send a summary to the client].",
    ]
    if site:
        parts.insert(
            -1,
            f"Impeachment notes: the testimony at page {d.num(10, 40)} [conflicts with|is consistent with|"
            "adds detail to] [the complaint|an earlier email|the incident report]; "
            "[flag for trial|raise at mediation|no action needed].",
        )
    return "\n\n".join(parts)


def _legal_intake(d: _Draw, p: _Person, site: bool) -> str:
    matter, company, claims, statute = _legal_setup(d)
    next_steps = (
        "request the personnel file",
        "obtain medical records",
        "send a litigation hold letter",
        "schedule a strategy meeting",
        "collect the signed agreement",
    )
    parts = [
        f"NEW CLIENT INTAKE AND CONFLICT CHECK\nIntake date: {d.day(2018, 2024)}  Intake attorney: {d.full_name()}",
        f"Prospective client: {p.name}  DOB: {p.dob}  Phone: {p.phone}\nReference number: {p.record_id}",
        "Contact: [prefers calls after 5 p.m.|prefers email|asked that messages not be left at work]; "
        "speaks [English|English and Spanish|English and Vietnamese]. "
        "Heard about the firm through [a friend|an online search|a community event].",
        f"Adverse parties: {company}; {d.full_name()}. Conflict search: [no conflicts found|"
        "one former client match, cleared by the ethics partner|no conflicts; waiver not required].",
        f"Summary of matter: {matter.facts(d, p, company)}",
        f"Potential claims: {_join(claims)} under {statute}. The limitations period is {d.num(1, 6)} years; "
        "[the deadline appears to be met|the deadline is close and must be calendared|tolling may apply].",
        f"Documents provided by client: {_join(d.several(_EVIDENCE, 2, 3))}. Estimated damages: "
        f"{d.money(10_000, 750_000, 1000)}. Referral source: "
        "[a former client|the state bar referral service|our website|another attorney].",
        f"Fee arrangement: [contingency fee of [33|35|40] percent|hourly rate of ${d.num(250, 650)} with a "
        f"{d.money(2_500, 15_000, 500)} retainer|flat fee of {d.money(3_000, 20_000, 500)}]. "
        "[The engagement letter was sent by email.|The client will sign the engagement letter at the next "
        "meeting.|Fee terms were explained and accepted.]",
        f"Next steps: {_join(d.several(next_steps, 2, 3))}.",
    ]
    if site:
        parts.insert(
            -1,
            "Urgency: [a preservation letter must go out this week|there are no immediate deadlines|"
            f"the client has a hearing in {d.num(5, 30)} days]; the matter is assigned to the "
            "[employment|litigation|consumer protection] group.",
        )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- finance

_LOANS: Final = (
    ("30-year fixed-rate mortgage", "purchase of a primary residence"),
    ("15-year fixed-rate mortgage", "refinance to lower the interest rate"),
    ("5/1 adjustable-rate mortgage", "purchase of a vacation home"),
    ("home equity line of credit", "home renovation"),
    ("small business term loan", "working capital for a growing business"),
    ("SBA 7(a) loan", "acquisition of restaurant equipment"),
    ("auto loan", "purchase of a used vehicle"),
    ("unsecured personal loan", "consolidation of credit card debt"),
    ("commercial real estate loan", "purchase of a small office building"),
    ("equipment financing", "purchase of construction machinery"),
)
_RISKS: Final = (
    "short time in the current job",
    "variable commission income",
    "a thin credit file",
    "high revolving utilization",
    "a recent large deposit not yet sourced",
    "concentration in a single customer",
)
_MITIGANTS: Final = (
    "twelve months of reserves",
    "a long history at the same employer",
    "a low loan-to-value ratio",
    "a strong guarantor",
    "stable rental income",
    "a perfect mortgage payment history",
)
_DOCUMENTS: Final = (
    "two years of tax returns",
    "the last two pay stubs",
    "three months of bank statements",
    "a signed purchase agreement",
    "a verification of employment",
    "a homeowners insurance binder",
    "a business plan",
)
_BUREAU: Final = "[Equifax|Experian|TransUnion]"
_COLLATERAL: Final = (
    "[a single-family residence|a two-unit townhouse|a 2021 pickup truck|business equipment and receivables|"
    "a retail condominium|no collateral (unsecured)]"
)
_INDUSTRY: Final = (
    "[family-owned restaurant group|regional trucking company|dental practice|commercial landscaping business|"
    "specialty metal fabricator|independent pharmacy|residential construction firm]"
)


def _request(d: _Draw) -> str:
    kind, purpose = d.pick(_LOANS)
    return f"{d.money(8_000, 900_000, 1000)} {kind} for {purpose}, over {d.pick((36, 60, 84, 120, 180, 360))} months"


def _finance_application(d: _Draw, p: _Person, site: bool) -> str:
    debts = ("an auto loan", "two credit cards", "student loans", "a personal loan", "a medical payment plan")
    parts = [
        f"LOAN APPLICATION FILE\nApplicant: {p.name}  DOB: {p.dob}  Phone: {p.phone}\n"
        f"Account number: {p.record_id}  Application date: {d.day(2019, 2024)}  Loan officer: {d.full_name()}",
        f"Request: {_request(d)} at a quoted rate of {d.real(3.1, 11.9, 2)}%.",
        f"Employment and income: {d.fake.job()} at {d.fake.company()} since {d.num(2004, 2022)}; base salary "
        f"{d.money(38_000, 260_000, 500)} per year[| plus an average bonus of {d.money(2_000, 40_000, 500)}|"
        " plus rental income].",
        f"Assets: checking and savings balances of {d.money(4_000, 180_000)}; retirement accounts of "
        f"{d.money(0, 600_000, 1000)}.",
        f"Liabilities: {_join(d.several(debts, 1, 3))}, with monthly payments of {d.money(200, 4_800, 10)}.",
        f"Credit: {_BUREAU} score {d.num(560, 830)}; {d.num(3, 24)} open tradelines; "
        "[no late payments in 24 months|one 30-day late payment in 2021|a collection account paid in full]. "
        f"Debt-to-income ratio {d.num(12, 52)}%.",
        f"Collateral: {_COLLATERAL}, valued at {d.money(10_000, 1_200_000, 1000)}. Property address: "
        f"{d.fake.street_address()}, {d.fake.city()}, {d.fake.state_abbr()} {d.fake.zipcode()}.",
        f"Housing expense: proposed monthly payment of {d.money(400, 7_500, 10)} including taxes and insurance. "
        "Declarations: [no bankruptcies, foreclosures or lawsuits|a bankruptcy discharged in 2015|"
        "a pending lawsuit as a witness only]; the applicant [is a first-time buyer|owns one other property|"
        "has co-signed a student loan].",
    ]
    if site:
        parts.append(f"Documents received:\n{_bullets(d.several(_DOCUMENTS, 3, 5))}")
    return "\n\n".join(parts)


def _finance_underwriting(d: _Draw, p: _Person, site: bool) -> str:
    conditions = (
        "receipt of a satisfactory appraisal",
        "proof of homeowners insurance",
        "payoff of one credit card",
        "a signed personal guarantee",
        "verification of reserves",
    )
    parts = [
        f"UNDERWRITING MEMORANDUM\nBorrower: {p.name} (DOB {p.dob}) | Account {p.record_id} | Phone {p.phone}\n"
        f"Prepared by: {d.full_name()}, Senior Underwriter | Date: {d.day(2019, 2024)}",
        f"Request: {_request(d)}.",
        f"Employment: {d.fake.job()} at {d.fake.company()} for {d.num(1, 22)} years, confirmed by "
        "[a written verification of employment|a phone call to human resources|two years of W-2 forms]. "
        "[Overtime is averaged over two years.|No bonus income was used to qualify.|"
        "Self-employment income was averaged from tax returns.]",
        f"Capacity: verified annual income of {d.money(38_000, 300_000, 500)} supports the proposed payment; "
        f"the debt-to-income ratio is {d.num(12, 52)}% after the new loan.",
        f"Credit: {_BUREAU} score of {d.num(560, 830)}, [a clean payment history|"
        "one late payment explained by a medical event|high revolving utilization].",
        f"Collateral: {_COLLATERAL}; loan-to-value ratio {d.num(40, 97)}%. The appraisal by "
        f"{d.full_name()} dated {d.day(2019, 2024)} "
        "[supports the value|came in below the contract price|notes deferred maintenance].",
        f"Capital: [post-closing reserves of|liquid assets of|a down payment of] {d.money(5_000, 250_000)}, "
        "sourced from [savings|the sale of a prior home|a documented gift|a retirement account].",
        f"Risk factors: {_join(d.several(_RISKS, 1, 2))}. Mitigants: {_join(d.several(_MITIGANTS, 1, 2))}.",
    ]
    if site:
        parts.append(f"Conditions: {_join(d.several(conditions, 2, 3))} prior to closing.")
    parts.append(
        "Recommendation: [Approve|Approve with conditions|Decline|Refer to credit committee]. "
        "[The file meets program guidelines.|An exception to the maximum ratio is requested.|"
        "Pricing should include a risk adjustment of 0.25%.]"
    )
    return "\n\n".join(parts)


def _finance_committee(d: _Draw, p: _Person, site: bool) -> str:
    company = d.fake.company()
    covenants = (
        "minimum debt service coverage of 1.25x",
        "annual financial statements within 120 days",
        "no additional debt without consent",
        "minimum liquidity of $250,000",
    )
    parts = [
        f"CREDIT COMMITTEE MINUTES\nMeeting date: {d.day(2019, 2024)}  Chair: {d.full_name()}\n"
        f"Members present: {_join([d.full_name() for _ in range(3)])}",
        f"Relationship: {p.name}, guarantor for {company}. Account: {p.record_id}. "
        f"Guarantor DOB {p.dob}; primary contact {p.phone}.",
        f"Background: {company} is a {_INDUSTRY} founded in {d.num(1985, 2019)} with "
        f"{d.num(6, 240)} employees and annual revenue of {d.money(500_000, 40_000_000, 10_000)}. "
        f"The company has banked with us for {d.num(1, 18)} years. "
        f"Risk factors: {_join(d.several(_RISKS, 1, 2))}.",
        f"Proposed exposure: {_request(d)}, bringing total relationship exposure to "
        f"{d.money(100_000, 4_000_000, 5000)}.",
        f"Risk rating: [4 (Pass)|5 (Pass)|6 (Watch)|7 (Special Mention)]. Debt service coverage is "
        f"{d.real(0.9, 2.4, 2)}x based on [trailing twelve months|the last two fiscal years|projected] cash flow.",
        "Discussion: Members [questioned the concentration in a single customer|noted strong liquidity|"
        "raised concerns about declining margins|discussed the guarantor's outside debts]. "
        "The relationship manager [confirmed a site visit last quarter|will obtain interim financials|"
        "expects deposits to grow].",
        f"Covenants: {_join(d.several(covenants, 2, 3))}.",
        f"Guarantor support: {p.honor} reports a personal net worth of {d.money(200_000, 9_000_000, 10_000)} "
        f"with liquid assets of {d.money(20_000, 1_500_000, 5000)}. "
        f"Mitigants: {_join(d.several(_MITIGANTS, 1, 2))}.",
        "Vote: [approved|approved with modifications|tabled pending more information], "
        f"{d.num(3, 5)} in favor and {d.num(0, 2)} opposed.",
    ]
    if site:
        parts.insert(
            -1,
            "Policy exceptions: [none|the loan-to-value ratio exceeds policy by 5%|"
            "guarantor liquidity is below the guideline], [approved by the chief credit officer|"
            "noted for the annual review|to be monitored quarterly].",
        )
    return "\n\n".join(parts)


def _finance_hardship(d: _Draw, p: _Person, site: bool) -> str:
    options = (
        "a three-month forbearance",
        "a repayment plan",
        "a loan modification extending the term",
        "a short sale",
        "a deed in lieu of foreclosure",
    )
    parts = [
        f"HARDSHIP AND LOSS MITIGATION REVIEW\nBorrower: {p.name}  Account: {p.record_id}  DOB: {p.dob}  "
        f"Phone: {p.phone}\nDate of contact: {d.day(2019, 2024)}  Specialist: {d.full_name()}",
        "Reason for hardship: [job loss after a plant closure|reduced hours at work|"
        "a serious illness in the family|divorce|damage to the home from a storm]. "
        f"The borrower says the hardship began {d.num(1, 11)} months ago.",
        f"Delinquency status: [30|60|90|120] days past due with an unpaid balance of "
        f"{d.money(800, 30_000, 10)}; the current principal balance is {d.money(20_000, 600_000, 1000)}.",
        f"Financial review: monthly household income of {d.money(1_500, 12_000, 50)} against expenses of "
        f"{d.money(1_200, 9_000, 50)}. [A pay stub|An unemployment benefits letter|A bank statement] "
        "was provided.",
        "Payment history: [the loan was current for five years before the hardship|"
        "two prior late payments were cured within the month|"
        "a prior forbearance was completed successfully in 2020]. "
        f"The last full payment was received {d.num(35, 130)} days ago. Notes from the call: the borrower "
        "[wants to keep the home|expects to return to work within two months|"
        "is considering selling the property] and [agreed to send documents this week|"
        "asked for the options in writing|was calm and cooperative].",
        f"Documents requested: {_join(d.several(_DOCUMENTS, 2, 3))}.",
        f"Options considered: {_join(d.several(options, 2, 3))}.",
        "Outcome: [approved a trial modification|approved forbearance|denied pending documents] "
        "by [the loss mitigation manager|the investor|the review committee]; "
        f"follow-up in {d.num(14, 45)} days.",
    ]
    if site:
        parts.insert(
            -1,
            'Borrower statement: "[I want to keep my home|I need a few months to get back on my feet|'
            "I have a new job starting soon] and [I can pay part of the balance now|"
            'I will send everything you need|I did not know about these options]."',
        )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- general prose


def _general_letter(d: _Draw) -> str:
    fake = d.fake
    return (
        f"{d.full_name()}\n{fake.street_address()}\n{fake.city()}, {fake.state_abbr()} {fake.zipcode()}\n"
        f"{d.day(2015, 2025)}\n\nDear {d.full_name()},\n\n"
        "[Thank you for your letter of last month and for the care you took in explaining the situation.|"
        "I am writing to follow up on our conversation about the upcoming project.|"
        "I wanted to let you know that our office will be moving at the end of the quarter.] "
        f"{fake.paragraph(nb_sentences=4)}\n\n{fake.paragraph(nb_sentences=3)} "
        f"Please call me at {d.phone()} if you have any questions.\n\nSincerely,\n{d.full_name()}"
    )


def _general_email(d: _Draw) -> str:
    fake = d.fake
    return (
        f"From: {fake.email()}\nTo: {fake.email()}\nDate: {d.day(2015, 2025)}\n"
        f"Subject: {fake.catch_phrase()}\n\nHi {fake.first_name()},\n\n"
        f"{fake.paragraph(nb_sentences=3)} The meeting is set for {d.day(2015, 2025)} at "
        f"{d.num(8, 17)}:[00|15|30|45]. {fake.paragraph(nb_sentences=2)}\n\n"
        f"Best,\n{d.full_name()}\n{fake.job()}, {fake.company()}"
    )


def _general_directory(d: _Draw) -> str:
    fake = d.fake
    entries = [
        f"{d.full_name()}, {fake.job()}\n{fake.street_address()}, {fake.city()}, {fake.state_abbr()} "
        f"{fake.zipcode()}\nPhone: {d.phone()}  Email: {fake.email()}"
        for _ in range(d.num(3, 6))
    ]
    return f"{fake.company()} staff directory, updated {d.day(2015, 2025)}\n\n" + "\n\n".join(entries)


def _general_minutes(d: _Draw) -> str:
    fake = d.fake
    items = [f"{fake.bs().capitalize()}: {fake.sentence(nb_words=12)}" for _ in range(d.num(3, 5))]
    return (
        f"Meeting notes, {fake.company()}, {d.day(2015, 2025)}\nAttendees: "
        f"{_join([d.full_name() for _ in range(d.num(2, 4))])}\n\n{_numbered(items)}\n\n"
        f"Action items: {fake.sentence(nb_words=10)} Budget approved: {d.money(1_000, 500_000)}."
    )


def _general_prose(d: _Draw) -> str:
    return "\n\n".join(d.fake.paragraph(nb_sentences=d.num(4, 7)) for _ in range(d.num(2, 4)))


def _general_figures(d: _Draw) -> str:
    fake = d.fake
    rows = [
        f"{fake.city()}: {d.num(100, 99_999):,} units, revenue {d.money(10_000, 9_000_000)}, "
        f"change {d.real(-12.0, 18.0)}%"
        for _ in range(d.num(4, 8))
    ]
    return f"{fake.company()} quarterly report, {d.day(2015, 2025)}\n\n" + "\n".join(rows)


_GENERAL: Final = (
    _general_letter,
    _general_email,
    _general_directory,
    _general_minutes,
    _general_prose,
    _general_figures,
)

# A document kind: builds one record for a person; ``site`` adds the sections held out of pre-training.
_Build = Callable[[_Draw, _Person, bool], str]


@dataclass(frozen=True)
class _Domain:
    kinds: tuple[_Build, ...]
    footer: str


_DOMAIN_STYLES: Final[Mapping[Domain, _Domain]] = {
    "clinical": _Domain(
        kinds=(_clinical_discharge, _clinical_progress, _clinical_emergency, _clinical_consult),
        footer="Electronically signed by Dr. {signed}. This note contains protected health information.",
    ),
    "legal": _Domain(
        kinds=(_legal_case_summary, _legal_memo, _legal_deposition, _legal_intake),
        footer="Prepared by {signed}. Privileged and confidential: attorney work product, do not forward.",
    ),
    "finance": _Domain(
        kinds=(_finance_application, _finance_underwriting, _finance_committee, _finance_hardship),
        footer="Reviewed by {signed}. Internal use only: contains nonpublic personal information of the customer.",
    ),
}


def _record(d: _Draw, domain: Domain, *, site: bool) -> tuple[str, _Person]:
    """One document of ``domain``; only site documents carry the held-out sections."""
    style = _DOMAIN_STYLES[domain]
    build = d.pick(style.kinds)
    person = d.person(domain)
    footer = style.footer.format(signed=f"{d.full_name()} on {d.day(2019, 2024)}")
    return d.vary(f"{build(d, person, site)}\n\n{footer}"), person


# --------------------------------------------------------------------------- public API


def generate_site(domain: Domain, spec: DataSpec) -> SiteData:
    """Build one site's records; the same ``(domain, spec)`` always gives the same data."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: must be one of {', '.join(DOMAINS)}, got {domain!r}")
    d = _Draw("site", domain, spec.seed, private=True)
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
    random.Random(_derive_seed("shuffle", data.domain, data.spec.seed)).shuffle(lines)
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
    d = _Draw("pretrain", seed, private=False)
    docs = []
    for _ in range(n_docs):
        if d.rng.random() < 0.2:
            docs.append(d.vary(d.pick(_GENERAL)(d)))
        else:
            docs.append(_record(d, d.pick(DOMAINS), site=False)[0])
    return docs
