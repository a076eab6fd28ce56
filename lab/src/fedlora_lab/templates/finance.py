"""Loan files: applications, underwriting notes, credit committee memos, hardship reviews."""

from __future__ import annotations

from typing import Final

from fedlora_lab.templates.draw import DomainStyle, Draw, Person, bullets, join_all

__all__ = ["STYLE"]

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


def _request(d: Draw) -> str:
    kind, purpose = d.pick(_LOANS)
    return f"{d.money(8_000, 900_000, 1000)} {kind} for {purpose}, over {d.pick((36, 60, 84, 120, 180, 360))} months"


def _finance_application(d: Draw, p: Person, site: bool) -> str:
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
        f"Liabilities: {join_all(d.several(debts, 1, 3))}, with monthly payments of {d.money(200, 4_800, 10)}.",
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
        parts.append(f"Documents received:\n{bullets(d.several(_DOCUMENTS, 3, 5))}")
    return "\n\n".join(parts)


def _finance_underwriting(d: Draw, p: Person, site: bool) -> str:
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
        f"Risk factors: {join_all(d.several(_RISKS, 1, 2))}. Mitigants: {join_all(d.several(_MITIGANTS, 1, 2))}.",
    ]
    if site:
        parts.append(f"Conditions: {join_all(d.several(conditions, 2, 3))} prior to closing.")
    parts.append(
        "Recommendation: [Approve|Approve with conditions|Decline|Refer to credit committee]. "
        "[The file meets program guidelines.|An exception to the maximum ratio is requested.|"
        "Pricing should include a risk adjustment of 0.25%.]"
    )
    return "\n\n".join(parts)


def _finance_committee(d: Draw, p: Person, site: bool) -> str:
    company = d.fake.company()
    covenants = (
        "minimum debt service coverage of 1.25x",
        "annual financial statements within 120 days",
        "no additional debt without consent",
        "minimum liquidity of $250,000",
    )
    parts = [
        f"CREDIT COMMITTEE MINUTES\nMeeting date: {d.day(2019, 2024)}  Chair: {d.full_name()}\n"
        f"Members present: {join_all([d.full_name() for _ in range(3)])}",
        f"Relationship: {p.name}, guarantor for {company}. Account: {p.record_id}. "
        f"Guarantor DOB {p.dob}; primary contact {p.phone}.",
        f"Background: {company} is a {_INDUSTRY} founded in {d.num(1985, 2019)} with "
        f"{d.num(6, 240)} employees and annual revenue of {d.money(500_000, 40_000_000, 10_000)}. "
        f"The company has banked with us for {d.num(1, 18)} years. "
        f"Risk factors: {join_all(d.several(_RISKS, 1, 2))}.",
        f"Proposed exposure: {_request(d)}, bringing total relationship exposure to "
        f"{d.money(100_000, 4_000_000, 5000)}.",
        f"Risk rating: [4 (Pass)|5 (Pass)|6 (Watch)|7 (Special Mention)]. Debt service coverage is "
        f"{d.real(0.9, 2.4, 2)}x based on [trailing twelve months|the last two fiscal years|projected] cash flow.",
        "Discussion: Members [questioned the concentration in a single customer|noted strong liquidity|"
        "raised concerns about declining margins|discussed the guarantor's outside debts]. "
        "The relationship manager [confirmed a site visit last quarter|will obtain interim financials|"
        "expects deposits to grow].",
        f"Covenants: {join_all(d.several(covenants, 2, 3))}.",
        f"Guarantor support: {p.honor} reports a personal net worth of {d.money(200_000, 9_000_000, 10_000)} "
        f"with liquid assets of {d.money(20_000, 1_500_000, 5000)}. "
        f"Mitigants: {join_all(d.several(_MITIGANTS, 1, 2))}.",
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


def _finance_hardship(d: Draw, p: Person, site: bool) -> str:
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
        f"Documents requested: {join_all(d.several(_DOCUMENTS, 2, 3))}.",
        f"Options considered: {join_all(d.several(options, 2, 3))}.",
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


STYLE: Final = DomainStyle(
    kinds=(_finance_application, _finance_underwriting, _finance_committee, _finance_hardship),
    footer="Reviewed by {signed}. Internal use only: contains nonpublic personal information of the customer.",
    id_prefix="ACCT",
)
