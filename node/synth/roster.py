"""Who is scanned when: synthetic patients, and which study of which kind belongs to whom.

Several studies share a patient (as in a real archive: a head CT and a later brain MR of the same
person), so tests and benchmarks can check patient-level splits. Names and IDs are obviously
synthetic (``PHANTOM^0001`` / ``PH0001``); dates are fixed offsets from a base date, never today.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from node.synth.determinism import derive_rng, derive_uid
from node.synth.spec import Kind

BASE_DATE = date(2024, 1, 8)


@dataclass(frozen=True)
class Patient:
    """A synthetic patient; ``index`` also seeds the anatomy shared by all their studies."""

    index: int
    name: str
    patient_id: str
    sex: Literal["F", "M"]
    birth_date: date

    def age_at(self, day: date) -> str:
        """DICOM Age String (``045Y``) on ``day``."""
        years = (
            day.year
            - self.birth_date.year
            - ((day.month, day.day) < (self.birth_date.month, self.birth_date.day))
        )
        return f"{max(years, 0):03d}Y"


@dataclass(frozen=True)
class StudyPlan:
    """One study to generate: its kind, patient, whether it carries findings, and its identity."""

    kind: Kind
    index: int  # 0-based among the studies of its kind
    number: int  # 1-based over the whole run: StudyID and accession number
    patient: Patient
    positive: bool
    study_datetime: datetime
    study_uid: str


def _patient(seed: int, index: int) -> Patient:
    rng = derive_rng(seed, "patient", index)
    sex: Literal["F", "M"] = "F" if rng.random() < 0.5 else "M"
    age_days = int(rng.integers(18 * 365, 90 * 365))
    return Patient(
        index=index,
        name=f"PHANTOM^{index:04d}",
        patient_id=f"PH{index:04d}",
        sex=sex,
        birth_date=BASE_DATE - timedelta(days=age_days),
    )


def plan_studies(
    seed: int, kinds: tuple[Kind, ...], studies_per_kind: int, prevalence: float
) -> list[StudyPlan]:
    """Lay out ``studies_per_kind`` studies of each kind over about 2/3 as many patients.

    Exactly ``round(prevalence * studies_per_kind)`` studies of each kind are positive (a fixed
    count, not a coin per study, so small runs still hold both classes), placed at random.
    """
    if studies_per_kind < 0:
        raise ValueError("studies must be >= 0")
    slots = [(kind, index) for kind in kinds for index in range(studies_per_kind)]
    if not slots:
        return []
    n_patients = max(1, math.ceil(2 * len(slots) / 3))
    patients = [_patient(seed, i + 1) for i in range(n_patients)]

    rng = derive_rng(seed, "roster", len(slots))
    order = rng.permutation(len(slots))
    owner = [0] * len(slots)
    for rank, slot in enumerate(order):
        owner[int(slot)] = rank if rank < n_patients else int(rng.integers(n_patients))

    positives: set[tuple[Kind, int]] = set()
    for kind in kinds:
        count = math.floor(prevalence * studies_per_kind + 0.5)
        chosen = derive_rng(seed, "prevalence", kind, studies_per_kind).permutation(studies_per_kind)[:count]
        positives.update((kind, int(i)) for i in chosen)

    plans: list[StudyPlan] = []
    for number, (kind, index) in enumerate(slots, start=1):
        when = derive_rng(seed, "schedule", kind, index)
        day = BASE_DATE + timedelta(days=int(when.integers(0, 365)))
        start = datetime(day.year, day.month, day.day, 7, 0, 0) + timedelta(
            seconds=int(when.integers(0, 12 * 3600))
        )
        plans.append(
            StudyPlan(
                kind=kind,
                index=index,
                number=number,
                patient=patients[owner[number - 1]],
                positive=(kind, index) in positives,
                study_datetime=start,
                study_uid=derive_uid(seed, kind, index, "study"),
            )
        )
    return plans
