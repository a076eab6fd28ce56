"""Clinical notes: discharge summaries, progress notes, emergency notes, consult letters."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Final

from fedlora_lab.templates.draw import DomainStyle, Draw, Person, bullets, join_all, numbered

__all__ = ["STYLE"]

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


def _labs(d: Draw) -> str:
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
    return join_all(d.several(results, 3, 5))


def _vitals(d: Draw) -> str:
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


def _hpi(d: Draw, p: Person, seen: date, history: Sequence[str]) -> str:
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
        f"{p.honor} is a {p.age_on(seen)}-year-old {p.noun} with a history of {join_all(history)} who presents "
        f"with {_DURATION} of {join_all(symptoms)}. {onset} "
        f"{p.cap_subj} denies [recent travel|sick contacts|new medications]."
    )


def _course(d: Draw, p: Person, diagnosis: str, meds: Sequence[str]) -> str:
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


def _clinical_discharge(d: Draw, p: Person, site: bool) -> str:
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
        f"Discharge medications:\n{bullets(meds)}\nAllergies: {d.pick(_ALLERGIES)}.",
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


def _clinical_progress(d: Draw, p: Person, site: bool) -> str:
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
        f"Denies {join_all(d.several(_SYMPTOMS, 2, 3))}.",
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
    parts.append("Plan:\n" + numbered(plan))
    return "\n\n".join(parts)


def _clinical_emergency(d: Draw, p: Person, site: bool) -> str:
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
        f"ED course and medical decision making: the differential diagnosis included {join_all(diagnoses)}. "
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


def _clinical_consult(d: Draw, p: Person, site: bool) -> str:
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
        f"{_DURATION} of {join_all(d.several(_SYMPTOMS, 1, 2))}. On examination {_EXAM}. "
        f"Recent results include {_labs(d)}.",
        f"Impression: {dx} ({icd}), [likely|probably|most consistent with] "
        "[a new diagnosis|a progression of known disease|a medication side effect].",
        "Recommendations:\n" + numbered(d.several(recommendations, 3, 5)),
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


STYLE: Final = DomainStyle(
    kinds=(_clinical_discharge, _clinical_progress, _clinical_emergency, _clinical_consult),
    footer="Electronically signed by Dr. {signed}. This note contains protected health information.",
    id_prefix="MRN",
)
