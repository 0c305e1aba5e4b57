"""What every result object says about its origin: IHE AIR Contributing Equipment and series naming.

IHE AI Results puts each algorithm in the Contributing Equipment Sequence with purpose of reference
(Newcode1, 99IHE, "Processing Algorithm") and the model's Device UID; the node recognises returning
results by exactly that code (``node.headers.PROCESSING_ALGORITHM_CODE``). highdicom only accepts
DCM purposes, so the item is built as Processing Equipment and its purpose replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.card import ModelCard
from models.tasks import PRIVATE_SCHEME
from workers.results.context import MAX_LO, ResultContext
from workers.results.uids import RunUids

IHE_SCHEME = "99IHE"
PROCESSING_ALGORITHM = hd.sr.CodedConcept(value="Newcode1", scheme_designator=IHE_SCHEME,
                                          meaning="Processing Algorithm")
SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002
KO_SERIES_NUMBER = 9003
SC_SERIES_NUMBER = 9004


def series_description(card: ModelCard) -> str:
    """How a PACS user recognises the results of a model version in the series list."""
    return f"AI RESULT {card.name} v{card.version}"[:MAX_LO]


def software_versions(context: ResultContext, card: ModelCard) -> list[str]:
    """The encoder's version and the model's: either changing makes a different result."""
    return [context.software_version, card.version]


def processing_algorithm(context: ResultContext, card: ModelCard, when: datetime) -> hd.ContributingEquipment:
    """A fresh IHE AIR "Processing Algorithm" item for one result object (items are never shared)."""
    item = hd.ContributingEquipment(
        manufacturer=context.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=software_versions(context, card),
        institution_name=context.institution_name,
        contribution_datetime=when,
        contribution_description=f"AI model {card.name} version {card.version} ({card.task})",
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = card.device_uid
    return item


def device_observer(context: ResultContext, card: ModelCard) -> hd.sr.ObserverContext:
    """The model as the observer (TID 1002 DEVICE): its Device UID names this very training."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=card.device_uid, name=card.name, manufacturer_name=context.manufacturer, model_name=card.name
    )
    return hd.sr.ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=device)


def coding_schemes(context: ResultContext, used: Iterable[str]) -> list[CodingSchemeIdentificationItem]:
    """Identify the private coding schemes an object uses (99IHE always, 99PACSNODE when used)."""
    items = [CodingSchemeIdentificationItem(
        designator=IHE_SCHEME, name="IHE Radiology Technical Framework", responsible_organization="IHE"
    )]
    if PRIVATE_SCHEME in set(used):
        items.append(CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="pacsnode findings", responsible_organization=context.manufacturer
        ))
    return items


def stamp_software_versions(ds: Dataset, context: ResultContext, card: ModelCard) -> None:
    """General Equipment of the object itself; set afterwards: highdicom's parameter takes one version."""
    ds.SoftwareVersions = software_versions(context, card)


def identity(context: ResultContext, card: ModelCard, uids: RunUids, role: str, series_number: int,
             when: datetime, schemes: Iterable[str]) -> dict[str, Any]:
    """The constructor arguments every result object shares: its UIDs (``<role>-series``, ``<role>``),
    series, equipment, coding schemes and dates (all from ``when``, so a rebuild is byte-identical)."""
    return {
        "series_instance_uid": uids.uid(f"{role}-series"), "series_number": series_number,
        "sop_instance_uid": uids.uid(role), "instance_number": 1,
        "manufacturer": context.manufacturer, "manufacturer_model_name": card.name,
        "software_versions": context.software_version, "institution_name": context.institution_name,
        "contributing_equipment": [processing_algorithm(context, card, when)],
        "series_description": series_description(card), "coding_schemes": coding_schemes(context, schemes),
        "content_date": when.date(), "content_time": when.time(), "series_date": when.date(),
        "series_time": when.time(),
    }
