"""Legal case files: case summaries, memos, deposition digests, intake notes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from fedlora_lab.templates.draw import DomainStyle, Draw, Person, join_all

__all__ = ["STYLE"]


@dataclass(frozen=True)
class _Matter:
    claims: tuple[str, ...]
    statutes: tuple[str, ...]
    facts: Callable[[Draw, Person, str], str]


def _facts_employment(d: Draw, p: Person, company: str) -> str:
    start = d.num(2008, 2018)
    return (
        f"{p.name} worked for {company} as a {d.fake.job().lower()} from {start} until {start + d.num(2, 6)}, "
        f"when {p.subj} was terminated [after reporting safety violations|following medical leave|"
        "after a dispute over overtime pay|shortly after turning sixty]. "
        f"{company} contends the termination was based on "
        "[poor performance reviews|a reduction in force|attendance problems]."
    )


def _facts_injury(d: Draw, p: Person, company: str) -> str:
    return (
        f"On {d.day(2016, 2023)}, {p.name} [slipped on|tripped over|was struck by] "
        "[a wet floor|an unsecured display|a falling shelf|a loose handrail] at a "
        f"[grocery store|warehouse|parking garage|hotel] operated by {company} and suffered "
        "[a fractured wrist|a herniated disc|a traumatic brain injury|a torn rotator cuff]. "
        f"Medical expenses to date exceed {d.money(18_000, 240_000, 500)}."
    )


def _facts_contract(d: Draw, p: Person, company: str) -> str:
    return (
        f"On {d.day(2014, 2022)}, {p.name} and {company} entered into a "
        "[supply agreement|services agreement|commercial lease|software license] under which "
        f"{company} agreed to [deliver equipment|provide consulting services|build out a retail space|"
        f"host a data platform] for {d.money(40_000, 2_000_000, 1000)}. {company} "
        "[failed to deliver on schedule|stopped performing after the second payment|"
        "delivered nonconforming goods]."
    )


def _facts_consumer(d: Draw, p: Person, company: str) -> str:
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


def _legal_setup(d: Draw) -> tuple[_Matter, str, list[str], str]:
    matter = d.pick(_MATTERS)
    return matter, d.fake.company(), d.several(matter.claims, 1, 2), d.pick(matter.statutes)


def _legal_case_summary(d: Draw, p: Person, site: bool) -> str:
    matter, company, claims, statute = _legal_setup(d)
    filed = d.day(2015, 2024)
    parts = [
        f"CASE SUMMARY\nMatter: {p.name} v. {company}\nCase No.: {p.record_id}\n"
        f"Court: {d.pick(_COURTS)}\nFiled: {filed}  Assigned judge: Hon. {d.full_name()}",
        f"Client: {p.name} (DOB {p.dob}), plaintiff. Client phone: {p.phone}.",
        f"Background: {matter.facts(d, p, company)}",
        f"Claims: The complaint asserts {join_all(claims)} under {statute} and seeks "
        "[compensatory damages|back pay and reinstatement|damages and injunctive relief] "
        f"of at least {d.money(50_000, 3_000_000, 5000)}.",
        f"Procedural history: {company} filed {_MOTION}, arguing that [the claims are time-barred|"
        "the complaint fails to state a claim|the parties agreed to arbitrate|"
        f"no genuine dispute of material fact exists]. {p.honor} opposed the motion and submitted "
        "[declarations|deposition excerpts|expert reports].",
        f"Key evidence: The record includes {join_all(d.several(_EVIDENCE, 2, 3))}. {d.full_name()}, a former "
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


def _legal_memo(d: Draw, p: Person, site: bool) -> str:
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
        f"We can respond with {join_all(d.several(_EVIDENCE, 1, 2))}, which "
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


def _legal_deposition(d: Draw, p: Person, site: bool) -> str:
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


def _legal_intake(d: Draw, p: Person, site: bool) -> str:
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
        f"Potential claims: {join_all(claims)} under {statute}. The limitations period is {d.num(1, 6)} years; "
        "[the deadline appears to be met|the deadline is close and must be calendared|tolling may apply].",
        f"Documents provided by client: {join_all(d.several(_EVIDENCE, 2, 3))}. Estimated damages: "
        f"{d.money(10_000, 750_000, 1000)}. Referral source: "
        "[a former client|the state bar referral service|our website|another attorney].",
        f"Fee arrangement: [contingency fee of [33|35|40] percent|hourly rate of ${d.num(250, 650)} with a "
        f"{d.money(2_500, 15_000, 500)} retainer|flat fee of {d.money(3_000, 20_000, 500)}]. "
        "[The engagement letter was sent by email.|The client will sign the engagement letter at the next "
        "meeting.|Fee terms were explained and accepted.]",
        f"Next steps: {join_all(d.several(next_steps, 2, 3))}.",
    ]
    if site:
        parts.insert(
            -1,
            "Urgency: [a preservation letter must go out this week|there are no immediate deadlines|"
            f"the client has a hearing in {d.num(5, 30)} days]; the matter is assigned to the "
            "[employment|litigation|consumer protection] group.",
        )
    return "\n\n".join(parts)


STYLE: Final = DomainStyle(
    kinds=(_legal_case_summary, _legal_memo, _legal_deposition, _legal_intake),
    footer="Prepared by {signed}. Privileged and confidential: attorney work product, do not forward.",
    id_prefix="CASE",
)
