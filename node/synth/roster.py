"""Who is scanned when: synthetic patients, and which study of which kind belongs to whom.

Several studies share a patient (as in a real archive: a head CT and a later brain MR of the same
person), so tests and benchmarks can check patient-level splits. Names and IDs are obviously
synthetic (``PHANTOM^0001`` / ``PH0001``); dates are fixed offsets from a base date, never today.

Patient IDs are numbered from 1 in every run, so two runs (two seeds) reuse the same IDs for
different phantoms. A run that must share no patient with another (an unlabelled pretraining
archive beside a labelled test set) gives each its own ``patient_prefix``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from node.synth.determinism import derive_rng, derive_uid
from node.synth.spec import Kind

BASE_DATE = date(2024, 1, 8)
DEFAULT_PATIENT_PREFIX = "PH"
# Letters, digits and '-' only: the ID stays a plain DICOM LO value and a safe file-name part.
_PREFIX = re.compile(r"[A-Za-z0-9-]{1,16}")


def check_patient_prefix(prefix: str) -> str:
    """``prefix`` if it can start a PatientID (1-16 letters, digits or '-'); else ``ValueError``."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"patient prefix must be 1-16 letters, digits or '-', got {prefix!r}")
    return prefix


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


def _patient(seed: int, index: int, prefix: str = DEFAULT_PATIENT_PREFIX) -> Patient:
    rng = derive_rng(seed, "patient", index)
    sex: Literal["F", "M"] = "F" if rng.random() < 0.5 else "M"
    age_days = int(rng.integers(18 * 365, 90 * 365))
    # The default keeps the historical names byte for byte; another prefix shows in the name too.
    name = f"PHANTOM^{index:04d}" if prefix == DEFAULT_PATIENT_PREFIX else f"PHANTOM^{prefix}{index:04d}"
    return Patient(
        index=index,
        name=name,
        patient_id=f"{prefix}{index:04d}",
        sex=sex,
        birth_date=BASE_DATE - timedelta(days=age_days),
    )


def plan_studies(
    seed: int,
    kinds: tuple[Kind, ...],
    studies_per_kind: int,
    prevalence: float,
    *,
    patient_prefix: str = DEFAULT_PATIENT_PREFIX,
) -> list[StudyPlan]:
    """Lay out ``studies_per_kind`` studies of each kind over about 2/3 as many patients.

    Exactly ``round(prevalence * studies_per_kind)`` studies of each kind are positive (a fixed
    count, not a coin per study, so small runs still hold both classes), placed at random.
    ``patient_prefix`` starts every PatientID (``PH0001``); it changes IDs (and names) only, never
    anatomy or findings, so runs with different prefixes cannot share a patient by ID.
    """
    if studies_per_kind < 0:
        raise ValueError("studies must be >= 0")
    check_patient_prefix(patient_prefix)
    slots = [(kind, index) for kind in kinds for index in range(studies_per_kind)]
    if not slots:
        return []
    n_patients = max(1, math.ceil(2 * len(slots) / 3))
    patients = [_patient(seed, i + 1, patient_prefix) for i in range(n_patients)]

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
