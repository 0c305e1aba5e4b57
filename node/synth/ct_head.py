"""Head CT phantom: HU-calibrated volume with intracranial haemorrhage of five subtypes.

Haemorrhage is drawn the way radiologists describe it: epidural as a biconvex lens against the
inner table, subdural as a crescent along the convexity, subarachnoid as blood filling the CSF
of sulci and surface, intraparenchymal as a lobulated blob with an oedema rim, intraventricular
as a dependent fluid level in a lateral ventricle. Every lesion is a mask first; the HU values
are written through that mask, so the labels are true by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from node.synth.grid import AxialGrid, BoolArray
from node.synth.head import HeadTissues, Tissue
from node.synth.lesions import Placement, count_between
from node.synth.noise import NoiseBank
from node.synth.spec import CT_FINDINGS, Difficulty

# HU per tissue label (Tissue order); a patient-level jitter is added to the soft tissues.
HU_BY_TISSUE: tuple[float, ...] = (-1000.0, 40.0, -90.0, 1500.0, 650.0, 6.0, 38.0, 28.0, 4.0, 36.0)
RESCALE_INTERCEPT = -1024.0
NOISE_HU = 4.0  # quantum noise of a standard head kernel, times Difficulty.noise
MAX_TRIES = 8


@dataclass(frozen=True)
class CTHead:
    """A rendered head CT: stored pixel values (HU + 1024, int16) and the haemorrhage placed."""

    grid: AxialGrid
    pixels: npt.NDArray[np.int16]
    placements: list[Placement]


def _clamp(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))


def _brain_slices(tissues: HeadTissues) -> npt.NDArray[np.intp]:
    """Slices with a wide brain cross-section, where lesions are placed."""
    c = tissues.anatomy.axes[2]
    ok = np.nonzero((tissues.hz > -18.0) & (tissues.hz < 0.72 * c))[0]
    return ok if ok.size else np.arange(tissues.grid.slices)


def _distance(
    tissues: HeadTissues, where: tuple[slice, slice, slice], centre: tuple[float, float, float]
) -> npt.NDArray[np.float32]:
    hz, hy, hx = tissues.frame(where)
    cx, cy, cz = centre
    d: npt.NDArray[np.float32] = np.sqrt((hx - cx) ** 2 + (hy - cy) ** 2 + (hz - cz) ** 2)
    return d


def _box(
    tissues: HeadTissues, centre: tuple[float, float, float], radius: float
) -> tuple[slice, slice, slice] | None:
    return tissues.grid.box(tissues.to_patient(*centre), (radius, radius, radius))


def _epidural(rng: np.random.Generator, tissues: HeadTissues, size: float, hz: float) -> Placement | None:
    pixel = tissues.grid.pixel_spacing
    angle = rng.uniform(0, 2 * np.pi)
    point = tissues.surface_point(hz, angle, tissues.inner())
    if point is None:
        return None
    half = _clamp(0.9 * size, 10.0, 45.0)
    thick = max(_clamp(0.35 * size, 3.0, 20.0), 2.5 * pixel)
    radius = (half * half + thick * thick) / (2 * thick)
    out = radius - thick
    normal = np.array([np.cos(angle), np.sin(angle)])
    centre = (point[0] + normal[0] * out, point[1] + normal[1] * out, hz)
    where = _box(tissues, (point[0], point[1], hz), float(np.hypot(half, thick)) + 2 * pixel)
    if where is None:
        return None
    mask = (_distance(tissues, where, centre) < radius) & (tissues.depth[where] >= tissues.inner())
    return Placement("epidural", tissues.to_patient(point[0], point[1], hz), size, where, mask, 0.0)


def _subdural(rng: np.random.Generator, tissues: HeadTissues, size: float, hz: float) -> Placement | None:
    grid = tissues.grid
    angle0 = rng.uniform(0, 2 * np.pi)
    half_angle = _clamp(0.5 + size / 60.0, 0.5, 1.2)
    thick = max(_clamp(0.3 * size, 3.0, 15.0), 2.5 * grid.pixel_spacing)
    half_z = _clamp(1.5 * size, 20.0, 60.0)
    k_lo, k_hi = (
        grid.slice_index(hz - half_z + tissues.anatomy.centre[2]),
        grid.slice_index(hz + half_z + tissues.anatomy.centre[2]),
    )
    where = (slice(k_lo, k_hi + 1), slice(0, grid.size), slice(0, grid.size))
    hzs, hy, hx = tissues.frame(where)
    delta = np.angle(np.exp(1j * (np.arctan2(hy, hx) - angle0))).astype(np.float32)
    taper = np.cos(np.pi / 2 * np.clip(np.abs(delta) / half_angle, 0, 1)) * np.cos(
        np.pi / 2 * np.clip(np.abs(hzs - hz) / half_z, 0, 1)
    )
    depth = tissues.depth[where]
    inner = tissues.inner()
    mask = (depth >= inner) & (depth < inner + thick * taper)
    point = tissues.surface_point(hz, angle0, inner)
    centre = tissues.to_patient(point[0], point[1], hz) if point else tissues.to_patient(0.0, 0.0, hz)
    return Placement("subdural", centre, size, where, mask, 0.0)


def _subarachnoid(rng: np.random.Generator, tissues: HeadTissues, size: float, hz: float) -> Placement | None:
    angle = rng.uniform(0, 2 * np.pi)
    point = tissues.surface_point(hz, angle, tissues.brain_depth() + 2.0)
    if point is None:
        return None
    radius = _clamp(size, 10.0, 40.0)
    centre = (point[0], point[1], hz)
    where = _box(tissues, centre, radius)
    if where is None:
        return None
    mask = (tissues.labels[where] == Tissue.CSF) & (_distance(tissues, where, centre) < radius)
    return Placement("subarachnoid", tissues.to_patient(*centre), size, where, mask, 0.0)


def _lumpy(
    rng: np.random.Generator,
    tissues: HeadTissues,
    where: tuple[slice, slice, slice],
    centre: tuple[float, float, float],
    radius: float,
) -> npt.NDArray[np.float32]:
    """Distance divided by a direction-dependent radius: < 1 inside a lobulated blob."""
    hz, hy, hx = tissues.frame(where)
    dx, dy, dz = hx - centre[0], hy - centre[1], hz - centre[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-3)
    ux, uy, uz = dx / dist, dy / dist, dz / dist
    c = rng.normal(0.0, 0.12, size=6).astype(np.float32)
    shape = (
        1 + c[0] * ux + c[1] * uy + c[2] * uz + c[3] * ux * uy + c[4] * (ux * ux - uy * uy) + c[5] * uz * ux
    )
    scaled: npt.NDArray[np.float32] = dist / (np.float32(radius) * np.clip(shape, 0.6, 1.4))
    return scaled


def _intraparenchymal(
    rng: np.random.Generator, tissues: HeadTissues, size: float, hz: float
) -> Placement | None:
    pixel = tissues.grid.pixel_spacing
    radius = max(_clamp(size / 2, 2.0, 30.0), 1.2 * pixel)
    angle = rng.uniform(0, 2 * np.pi)
    depth = tissues.brain_depth() + rng.uniform(radius + 6.0, radius + 35.0)
    point = tissues.surface_point(hz, angle, depth)
    if point is None:
        return None
    centre = tissues.from_patient(*tissues.grid.snap(tissues.to_patient(point[0], point[1], hz)))
    where = _box(tissues, centre, 1.6 * radius + 6.0)
    if where is None:
        return None
    labels = tissues.labels[where]
    parenchyma = (
        (labels == Tissue.GREY)
        | (labels == Tissue.WHITE)
        | (labels == Tissue.NUCLEI)
        | (labels == Tissue.CSF)
    )
    scaled = _lumpy(rng, tissues, where, centre, radius)
    mask = (scaled < 1.0) & parenchyma
    halo = (scaled < 1.0 + 5.0 / radius) & ~mask & parenchyma & (labels != Tissue.CSF)
    return Placement("intraparenchymal", tissues.to_patient(*centre), size, where, mask, 0.0, halo)


def _intraventricular(
    rng: np.random.Generator, tissues: HeadTissues, size: float, hz: float
) -> Placement | None:
    anatomy, pixel = tissues.anatomy, tissues.grid.pixel_spacing
    side = 1.0 if rng.random() < 0.5 else -1.0
    _, vy, vz = anatomy.ventricle_offset
    va, vb, vc = anatomy.ventricle_axes
    height = max(_clamp(0.3 * size, 2.5, 1.5 * vb), 2.0 * pixel)
    level = vy + vb - height
    centre = (side * anatomy.ventricle_separation, vy + vb - height / 2, vz)
    where = _box(tissues, (side * anatomy.ventricle_separation, vy, vz), max(va, vb, vc) + 25.0)
    if where is None:
        return None
    _, hy, hx = tissues.frame(where)
    mask = (tissues.labels[where] == Tissue.VENTRICLE) & (hy > level) & (hx * side > 0)
    return Placement("intraventricular", tissues.to_patient(*centre), size, where, mask, 0.0)


_BUILDERS: Mapping[str, Callable[[np.random.Generator, HeadTissues, float, float], Placement | None]] = (
    MappingProxyType(
        {
            "epidural": _epidural,
            "subdural": _subdural,
            "subarachnoid": _subarachnoid,
            "intraparenchymal": _intraparenchymal,
            "intraventricular": _intraventricular,
        }
    )
)


def place_haemorrhages(
    rng: np.random.Generator, tissues: HeadTissues, difficulty: Difficulty
) -> list[Placement]:
    """Between ``lesion_count`` bounds haemorrhages of random subtypes; at least one is non-empty.

    A shape that misses every voxel (a thin bleed between two thick slices) is drawn again, and if
    all fail an intraparenchymal blob centred on a voxel (which cannot miss) is placed.
    """
    slices = _brain_slices(tissues)
    contrast = difficulty.lesion_contrast
    placements: list[Placement] = []
    for _ in range(count_between(rng, difficulty.lesion_count)):
        subtype = str(rng.choice(CT_FINDINGS))
        for _ in range(MAX_TRIES):
            size = float(rng.uniform(*difficulty.lesion_size_mm))
            k = int(rng.choice(slices))
            placement = _BUILDERS[subtype](rng, tissues, size, float(tissues.hz[k]))
            if placement is not None and placement.voxels > 0:
                hu = _clamp(40.0 + 35.0 * contrast + rng.uniform(-6.0, 6.0), 45.0, 95.0)
                placements.append(placement.with_value(hu))
                break
    if not placements:
        size = float(max(difficulty.lesion_size_mm[1], 6.0))
        for k in np.concatenate([slices[len(slices) // 2 :], slices[: len(slices) // 2]]):
            placement = _intraparenchymal(rng, tissues, size, float(tissues.hz[int(k)]))
            if placement is not None and placement.voxels > 0:
                placements.append(placement.with_value(_clamp(40.0 + 35.0 * contrast, 45.0, 95.0)))
                break
    if not placements:
        raise RuntimeError("could not place any haemorrhage in the head phantom")
    return placements


def render_ct(
    rng: np.random.Generator, tissues: HeadTissues, placements: list[Placement], difficulty: Difficulty
) -> npt.NDArray[np.int16]:
    """Stored CT values: HU - RESCALE_INTERCEPT, with quantum noise, as int16."""
    table = np.array(HU_BY_TISSUE, dtype=np.float32)
    table[[Tissue.CSF, Tissue.GREY, Tissue.WHITE, Tissue.VENTRICLE, Tissue.NUCLEI]] += rng.normal(
        0.0, 1.5, size=5
    )
    hu = table[tissues.labels]
    for placement in placements:
        if placement.halo is not None:
            hu[placement.where][placement.halo] = np.float32(18.0)
    for placement in placements:
        view = hu[placement.where]
        texture = rng.normal(0.0, 3.0, size=placement.voxels).astype(np.float32)
        view[placement.mask] = np.float32(placement.value) + texture
    sigma = NOISE_HU * difficulty.noise
    grid = tissues.grid
    bank = NoiseBank(rng, grid.slices, grid.size, grid.size)
    stored = np.empty(grid.shape, dtype=np.int16)
    for k in range(grid.slices):
        plane = hu[k]
        if sigma > 0:
            plane += bank.plane(k, sigma)
        plane -= np.float32(RESCALE_INTERCEPT)
        np.rint(plane, out=plane)
        np.clip(plane, 0, 4095, out=plane)
        stored[k] = plane
    return stored


def build_ct_head(
    rng: np.random.Generator, tissues: HeadTissues, difficulty: Difficulty, positive: bool
) -> CTHead:
    """Render one head CT; ``positive`` studies carry at least one haemorrhage."""
    placements = place_haemorrhages(rng, tissues, difficulty) if positive else []
    return CTHead(
        grid=tissues.grid, pixels=render_ct(rng, tissues, placements, difficulty), placements=placements
    )


def slice_masks(grid: AxialGrid, placements: list[Placement]) -> dict[str, BoolArray]:
    """Per subtype, which slices contain at least one voxel of it."""
    present: dict[str, BoolArray] = {}
    for placement in placements:
        hit = np.zeros(grid.slices, dtype=bool)
        ks = placement.where[0]
        hit[ks] = placement.mask.reshape(placement.mask.shape[0], -1).any(axis=1)
        present[placement.finding] = present.get(placement.finding, np.zeros(grid.slices, dtype=bool)) | hit
    return present
