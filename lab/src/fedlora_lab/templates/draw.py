"""The seeded stream every template draws from, the person a record is about, and a document kind's shape.

All randomness comes from per-call seeded streams (``Faker.seed_instance`` and ``random.Random``),
never from global state. Person values (full names, record numbers, phones, dates of birth) come
from one of two disjoint halves of their space, split by a keyed hash: site data only uses the
private half, the pre-training corpus only the public half.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, TypeVar

from faker import Faker

__all__ = ["Build", "DomainStyle", "Draw", "Person", "bullets", "derive_seed", "join_all", "numbered"]

_T = TypeVar("_T")
_ALTERNATIVES: Final = re.compile(r"\[([^\[\]|]*(?:\|[^\[\]|]*)+)\]")


def derive_seed(*key: object) -> int:
    """A 64-bit seed for one named stream, so streams never share state or overlap by accident."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")


def _is_private(value: str) -> bool:
    """Which half of a value space ``value`` belongs to: private for sites, public for pre-training."""
    return hashlib.sha256(b"fedlora-lab-pii\x00" + value.encode()).digest()[0] & 1 == 1


@dataclass(frozen=True)
class Person:
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


class Draw:
    """One seeded stream of values; person values come from one half of their space, never repeated."""

    def __init__(self, *key: object, private: bool) -> None:
        self.fake = Faker("en_US")
        self.fake.seed_instance(derive_seed("faker", *key))
        self.rng = random.Random(derive_seed("random", *key))
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

    def person(self, id_prefix: str) -> Person:
        """A person with a record number like ``MRN-1234-5678`` (``id_prefix`` is the domain's)."""
        female = self.rng.random() < 0.5
        first, last = self.full_name(female).split(" ", 1)
        record_id = self._fresh(lambda: f"{id_prefix}-{self.num(1000, 9999)}-{self.num(1000, 9999)}")
        dob = date.fromisoformat(self._fresh(lambda: str(self.day(1938, 2001))))
        return Person(first, last, female, record_id, self.phone(), dob)


def bullets(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def numbered(items: Iterable[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def join_all(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# A document kind: builds one record for a person; ``site`` adds the sections held out of pre-training.
Build = Callable[[Draw, Person, bool], str]


@dataclass(frozen=True)
class DomainStyle:
    """A domain's document kinds, the footer every record ends with, and its record-number prefix."""

    kinds: tuple[Build, ...]
    footer: str
    id_prefix: str
