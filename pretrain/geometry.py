"""Where a frame lies: pixel spacing, slice thickness and position along the slice normal.

Shared by the archive index (ordering slices for pretraining and finetuning) and the inference
workers (ordering a series' slices, computing lesion volumes), so both see one geometry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset

from pretrain.decode import functional_item


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a multi-valued DS, or ``None``."""
    if value is None:
        return None
    try:
        numbers = tuple(float(item) for item in (value if isinstance(value, Iterable) else [value]))
    except (TypeError, ValueError):
        return None
    if len(numbers) < count or not all(math.isfinite(number) for number in numbers[:count]):
        return None
    return numbers[:count]


def frame_spacing(ds: Dataset, frame: int) -> tuple[float | None, float | None, float | None]:
    """(row spacing, column spacing, slice thickness) in mm, each ``None`` where absent."""
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    thickness = _floats(ds.get("SliceThickness"), 1)
    measures = functional_item(ds, frame, "PixelMeasuresSequence")
    if measures is not None:
        spacing = spacing or _floats(measures.get("PixelSpacing"), 2)
        thickness = thickness or _floats(measures.get("SliceThickness"), 1)
    row, column = spacing if spacing else (None, None)
    return row, column, thickness[0] if thickness else None


def slice_position(ds: Dataset, frame: int) -> float | None:
    """Position along the slice normal (mm), from the frame's plane position and orientation."""
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if position is None:
        item = functional_item(ds, frame, "PlanePositionSequence")
        position = _floats(item.get("ImagePositionPatient"), 3) if item is not None else None
    if orientation is None:
        item = functional_item(ds, frame, "PlaneOrientationSequence")
        orientation = _floats(item.get("ImageOrientationPatient"), 6) if item is not None else None
    if position is None or orientation is None:
        return None
    (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    if not any(normal):
        return None
    return float(sum(n * p for n, p in zip(normal, position, strict=True)))
