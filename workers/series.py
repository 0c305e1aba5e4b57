"""Which images of a dispatched study a model runs on, in which order.

Routing matched the study on series attributes; this decides per model, from its card's
``applies_to``: the right modality (and body part where the header says one), primary images only
(no LOCALIZER, no DERIVED or SECONDARY reconstructions), enough slices for a volume model, and one
series among duplicate reconstructions (the one with most usable slices, then the thinnest, then
the lowest series number). Enhanced multi-frame objects contribute one slice per frame. Slices are
ordered along the slice normal (ImagePositionPatient projected on it), falling back to
InstanceNumber where the geometry is missing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from models.card import AppliesTo
from models.dataset import is_primary_image
from node.messages import SeriesRef
from pretrain.decode import PixelDataError, number_of_frames, read_dataset
from pretrain.geometry import frame_spacing, slice_position


class NotApplicable(Exception):
    """The study holds nothing this model can use; the message is the reason the node shows."""


@dataclass(frozen=True)
class SliceInput:
    """One frame the model sees: the file, the frame within it and its header."""

    path: Path
    frame: int
    header: Dataset
    position: float | None

    @property
    def sop_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


@dataclass(frozen=True)
class SelectedSeries:
    series_uid: str
    slices: tuple[SliceInput, ...]
    skipped: dict[str, int]

    @property
    def headers(self) -> tuple[Dataset, ...]:
        """The distinct instances in slice order (a multi-frame object once)."""
        seen: dict[str, Dataset] = {}
        for item in self.slices:
            seen.setdefault(item.sop_uid, item.header)
        return tuple(seen.values())

    def spacing_mm(self) -> tuple[float, float, float]:
        """(slice, row, column) voxel size for lesion volumes; 1 mm where the header is silent."""
        first = self.slices[0]
        row, column, thickness = frame_spacing(first.header, first.frame)
        positions = [s.position for s in self.slices if s.position is not None]
        steps = sorted(abs(b - a) for a, b in itertools.pairwise(positions) if b != a)
        between = steps[len(steps) // 2] if steps else None
        return (between or thickness or 1.0, row or 1.0, column or 1.0)


def _image_type(ds: Dataset) -> str:
    value = ds.get("ImageType")
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if not isinstance(value, str) else value


def _why_not(ds: Dataset, applies: AppliesTo) -> str | None:
    modality = str(ds.get("Modality", "")).upper()
    if modality not in {m.upper() for m in applies.modalities}:
        return f"modality {modality or 'missing'}"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part and applies.body_parts and body_part not in {b.upper() for b in applies.body_parts}:
        return f"body part {body_part}"
    if not is_primary_image(_image_type(ds)):
        return "localizer or derived image"
    if "Rows" not in ds:
        return "no image"
    return None


def _slices(path: Path, ds: Dataset) -> list[SliceInput]:
    return [SliceInput(path, frame, ds, slice_position(ds, frame)) for frame in range(number_of_frames(ds))]


def _ordered(slices: list[SliceInput]) -> list[SliceInput]:
    if all(s.position is not None for s in slices):
        return sorted(slices, key=lambda s: (s.position, s.frame))
    return sorted(slices, key=lambda s: (int(s.header.get("InstanceNumber") or 0), s.frame))


def _rank(series: list[SliceInput]) -> tuple[int, float, int]:
    """Sort key of duplicate reconstructions: most slices, thinnest, lowest series number first."""
    first = series[0]
    thickness = frame_spacing(first.header, first.frame)[2]
    number = first.header.get("SeriesNumber")
    return (-len(series), thickness if thickness is not None else float("inf"),
            int(number) if number is not None else 1 << 30)


def select_series(store_root: Path, refs: Sequence[SeriesRef], applies: AppliesTo) -> SelectedSeries:
    """The series the model runs on; raises :class:`NotApplicable` with the reason when there is none."""
    candidates: dict[str, list[SliceInput]] = {}
    skipped: dict[str, int] = {}
    for ref in refs:
        for relative in ref.instances:
            path = store_root / relative
            try:
                ds = read_dataset(path, header_only=True)
            except PixelDataError as exc:
                skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                continue
            why = _why_not(ds, applies)
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            candidates.setdefault(str(ds.SeriesInstanceUID), []).extend(_slices(path, ds))
    if not candidates:
        seen = ", ".join(f"{reason} x{count}" for reason, count in sorted(skipped.items())) or "no instances"
        raise NotApplicable(f"no image this model applies to ({'/'.join(applies.modalities)}): {seen}")
    series_uid, slices = min(candidates.items(), key=lambda item: _rank(item[1]))
    if len(slices) < applies.min_slices:
        raise NotApplicable(f"series has {len(slices)} usable slices, the model needs at least {applies.min_slices}")
    return SelectedSeries(series_uid, tuple(_ordered(slices)), skipped)
