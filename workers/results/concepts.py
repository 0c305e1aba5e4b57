"""Coded concepts of the result objects: the card's findings and the codes that qualify them."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.tasks import CodedConcept

PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
VOLUME = codes.SCT.Volume
CUBIC_MILLIMETER = codes.UCUM.CubicMillimeter
MAXIMUM = codes.SCT.Maximum
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure
HEAD_PARTS = frozenset({"HEAD", "BRAIN", "SKULL"})


def coded(concept: CodedConcept) -> hd.sr.CodedConcept:
    """The card's concept (SCT or the private 99PACSNODE scheme) as highdicom wants it."""
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


def procedure_reported(image: Dataset) -> Code:
    """What the SR reports on: the imaging procedure (TID 1500 row 4), not the algorithm.

    Derived from the first source image's modality and body part, with codes of DICOM's own
    dictionary (CID 100 where it has one); an unknown combination gets "Imaging procedure".
    """
    modality = str(image.get("Modality", "")).upper()
    body_part = str(image.get("BodyPartExamined", "")).upper()
    if modality == "CT":
        return codes.SCT.ComputedTomographyOfHead if body_part in HEAD_PARTS else codes.cid100.CTUnspecifiedBodyRegion
    if modality == "MR":
        return codes.cid100.MRIUnspecifiedBodyRegion
    if modality in ("CR", "DX"):
        return codes.SCT.ChestImaging if body_part == "CHEST" else codes.cid100.XRUnspecifiedBodyRegion
    return codes.cid100.ImagingProcedure
