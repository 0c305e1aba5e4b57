"""The results' one point in time, and its stamping over every clock value highdicom writes.

highdicom takes ``datetime.now()`` for Instance Creation, Content, Series and Secondary Capture
date/time and for the Contribution DateTime of its own Contributing Equipment item, and a random
Dimension Organization UID for a SEG. Any of these would make a rebuilt object differ from the
first one, so after construction all of them are replaced with values derived from the outcome.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

HIGHDICOM_MANUFACTURER = "Highdicom open-source contributors"
_STAMPED_PAIRS = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
)


def result_moment(completed_at: float) -> datetime:
    """When the study version was closed, in UTC (naive), the content time of all its results.

    UTC, not the host's zone, so that two workers in different zones build identical objects.
    """
    return datetime.fromtimestamp(completed_at, tz=UTC).replace(tzinfo=None)


def pin_clock(ds: Dataset, when: datetime, dimension_organization_uid: str | None = None) -> None:
    """Overwrite what highdicom took from the clock (and a SEG's random dimension UID) in place."""
    for date_keyword, time_keyword in _STAMPED_PAIRS:
        if date_keyword in ds:
            setattr(ds, date_keyword, DA(when.date()))
        if time_keyword in ds:
            setattr(ds, time_keyword, TM(when.time()))
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == HIGHDICOM_MANUFACTURER:
            item.ContributionDateTime = DT(when)
    if dimension_organization_uid is not None:
        _pin_dimension_uid(ds, dimension_organization_uid)


def _pin_dimension_uid(node: Dataset, uid: str) -> None:
    for element in node:
        if element.keyword == "DimensionOrganizationUID":
            element.value = uid
        elif element.VR == "SQ":
            for item in element.value:
                _pin_dimension_uid(item, uid)
