"""Records of placed lesions, shared by the three phantom kinds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from node.synth.grid import BoolArray


@dataclass(frozen=True)
class Placement:
    """A lesion sampled on a grid: its voxels inside a box of the full array.

    ``halo`` is tissue the lesion changes without being part of it (oedema around a haematoma or
    a metastasis); it is rendered but never enters a ground-truth mask. ``core`` is a part of the
    lesion rendered at ``core_value`` instead of ``value`` (the necrotic centre of a ring-enhancing
    metastasis); it stays in the mask.
    """

    finding: str
    centre: tuple[float, ...]  # patient coordinates (mm): (x, y, z) or (x, y) for radiographs
    size_mm: float
    where: tuple[slice, ...]
    mask: BoolArray
    value: float
    halo: BoolArray | None = None
    core: BoolArray | None = None
    core_value: float = 0.0

    def with_value(self, value: float) -> Placement:
        """The same lesion rendered at ``value``."""
        return replace(self, value=value)

    @cached_property
    def voxels(self) -> int:
        """Voxels in the mask (the mask never changes: cached)."""
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True)
class LesionRecord:
    """What the manifest says about one lesion (JSON-able)."""

    finding: str
    centre_mm: tuple[float, ...]
    size_mm: float
    voxels: int
    volume_mm3: float

    def as_dict(self) -> dict[str, object]:
        return {
            "finding": self.finding,
            "centre_mm": [round(c, 2) for c in self.centre_mm],
            "size_mm": round(self.size_mm, 2),
            "voxels": self.voxels,
            "volume_mm3": round(self.volume_mm3, 2),
        }


def merge_masks(shape: tuple[int, ...], placements: list[Placement]) -> dict[str, BoolArray]:
    """Full-size mask per finding (only findings with at least one voxel)."""
    masks: dict[str, BoolArray] = {}
    for placement in placements:
        if placement.voxels == 0:
            continue
        target = masks.setdefault(placement.finding, np.zeros(shape, dtype=bool))
        target[placement.where] |= placement.mask
    return masks


def count_between(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """An integer in ``[low, high]`` inclusive."""
    return int(rng.integers(bounds[0], bounds[1] + 1))
