"""General prose for pre-training only: letters, emails, directories, minutes, figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from fedlora_lab.templates.draw import Draw, join_all, numbered

__all__ = ["GENERAL"]


def _general_letter(d: Draw) -> str:
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


def _general_email(d: Draw) -> str:
    fake = d.fake
    return (
        f"From: {fake.email()}\nTo: {fake.email()}\nDate: {d.day(2015, 2025)}\n"
        f"Subject: {fake.catch_phrase()}\n\nHi {fake.first_name()},\n\n"
        f"{fake.paragraph(nb_sentences=3)} The meeting is set for {d.day(2015, 2025)} at "
        f"{d.num(8, 17)}:[00|15|30|45]. {fake.paragraph(nb_sentences=2)}\n\n"
        f"Best,\n{d.full_name()}\n{fake.job()}, {fake.company()}"
    )


def _general_directory(d: Draw) -> str:
    fake = d.fake
    entries = [
        f"{d.full_name()}, {fake.job()}\n{fake.street_address()}, {fake.city()}, {fake.state_abbr()} "
        f"{fake.zipcode()}\nPhone: {d.phone()}  Email: {fake.email()}"
        for _ in range(d.num(3, 6))
    ]
    return f"{fake.company()} staff directory, updated {d.day(2015, 2025)}\n\n" + "\n\n".join(entries)


def _general_minutes(d: Draw) -> str:
    fake = d.fake
    items = [f"{fake.bs().capitalize()}: {fake.sentence(nb_words=12)}" for _ in range(d.num(3, 5))]
    return (
        f"Meeting notes, {fake.company()}, {d.day(2015, 2025)}\nAttendees: "
        f"{join_all([d.full_name() for _ in range(d.num(2, 4))])}\n\n{numbered(items)}\n\n"
        f"Action items: {fake.sentence(nb_words=10)} Budget approved: {d.money(1_000, 500_000)}."
    )


def _general_prose(d: Draw) -> str:
    return "\n\n".join(d.fake.paragraph(nb_sentences=d.num(4, 7)) for _ in range(d.num(2, 4)))


def _general_figures(d: Draw) -> str:
    fake = d.fake
    rows = [
        f"{fake.city()}: {d.num(100, 99_999):,} units, revenue {d.money(10_000, 9_000_000)}, "
        f"change {d.real(-12.0, 18.0)}%"
        for _ in range(d.num(4, 8))
    ]
    return f"{fake.company()} quarterly report, {d.day(2015, 2025)}\n\n" + "\n".join(rows)


GENERAL: Final[tuple[Callable[[Draw], str], ...]] = (
    _general_letter,
    _general_email,
    _general_directory,
    _general_minutes,
    _general_prose,
    _general_figures,
)
