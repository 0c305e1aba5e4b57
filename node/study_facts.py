"""A study's identity as people know it (patient, accession number), read from its first stored
instance whenever a view needs it: the index deliberately keeps none of it, so purging a study's
files leaves no PHI behind, and a log line built from index rows cannot leak it.

The RIS notification (HL7 PID/OBR) and the worklist page both read it here. Callers must never
log these values.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError

from node.index import StudyIndex
from node.store import StudyStore

FACT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                 "AccessionNumber", "StudyDescription")


@dataclass(frozen=True)
class StudyFacts:
    """What the ORU and the worklist say of the study itself; empty where the header is silent."""

    study_uid: str
    version: int
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession: str = ""
    description: str = ""


def read_study_facts(index: StudyIndex, store: StudyStore, study_uid: str, version: int) -> StudyFacts:
    """From the study's first stored instance, header only; all empty if it cannot be read."""
    path = index.first_instance_path(study_uid)
    if path is None:
        return StudyFacts(study_uid, version)
    try:
        ds = pydicom.dcmread(store.resolve(path), stop_before_pixels=True, specific_tags=list(FACT_KEYWORDS))
    except (OSError, InvalidDicomError, ValueError):
        return StudyFacts(study_uid, version)
    return StudyFacts(study_uid, version, *(str(ds.get(k, "") or "") for k in FACT_KEYWORDS))
