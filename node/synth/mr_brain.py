"""Post-contrast T1 brain MR phantom with enhancing metastases.

Metastases sit where they do clinically, near the grey-white junction; small ones enhance solidly,
larger ones as a rim around a necrotic core, each inside a rim of T1-dark vasogenic oedema. The
dura enhances faintly too, so a model cannot just threshold the brightest voxels. Signal is
Rician (the magnitude of complex Gaussian noise) over a smooth coil bias field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from node.synth.grid import AxialGrid
from node.synth.head import HeadTissues, Tissue
from node.synth.lesions import Placement, count_between
from node.synth.noise import NoiseBank
from node.synth.spec import Difficulty

# T1 post-contrast signal per tissue label (Tissue order), arbitrary units in a 12-bit range.
SIGNAL_BY_TISSUE: tuple[float, ...] = (0.0, 520.0, 1300.0, 40.0, 1050.0, 220.0, 640.0, 900.0, 200.0, 700.0)
WHITE_SIGNAL = SIGNAL_BY_TISSUE[Tissue.WHITE]
NECROSIS_SIGNAL = 330.0
OEDEMA_FACTOR = 0.72
DURA_SIGNAL = 820.0
NOISE_SIGMA = 18.0  # Rician sigma, times Difficulty.noise
MAX_TRIES = 40


@dataclass(frozen=True)
class MRBrain:
    """A rendered brain MR: stored uint16 pixel values and the metastases placed."""

    grid: AxialGrid
    pixels: npt.NDArray[np.uint16]
    placements: list[Placement]


def _is_parenchyma(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    result: npt.NDArray[np.bool_] = (
        (labels == Tissue.GREY) | (labels == Tissue.WHITE) | (labels == Tissue.NUCLEI)
    )
    return result


def place_metastases(
    rng: np.random.Generator, tissues: HeadTissues, difficulty: Difficulty
) -> list[Placement]:
    """``lesion_count`` non-overlapping spheres, centred on voxels near the grey-white junction."""
    grid, anatomy = tissues.grid, tissues.anatomy
    slices = np.nonzero((tissues.hz > -15.0) & (tissues.hz < 0.68 * anatomy.axes[2]))[0]
    if slices.size == 0:
        slices = np.arange(grid.slices)
    junction = tissues.brain_depth() + max(anatomy.cortex, 1.5 * grid.pixel_spacing)
    wanted = count_between(rng, difficulty.lesion_count)
    placements: list[Placement] = []
    taken: list[tuple[tuple[float, float, float], float]] = []
    for _ in range(wanted * MAX_TRIES):
        if len(placements) == wanted:
            break
        diameter = max(float(rng.uniform(*difficulty.lesion_size_mm)), 3.0, 1.5 * grid.pixel_spacing)
        radius = diameter / 2
        hz = float(tissues.hz[int(rng.choice(slices))])
        depth = junction + float(rng.uniform(-1.0, 12.0)) + 0.4 * radius
        point = tissues.surface_point(hz, float(rng.uniform(0, 2 * np.pi)), depth)
        if point is None:
            continue
        patient = grid.snap(tissues.to_patient(point[0], point[1], hz))
        centre = tissues.from_patient(*patient)
        if any(math.dist(centre, other) < radius + other_radius + 4.0 for other, other_radius in taken):
            continue
        if not _is_parenchyma(np.asarray(tissues.labels[grid.index_of(patient)])):
            continue
        halo_radius = radius * float(rng.uniform(1.6, 2.6))
        where = grid.box(patient, (halo_radius + 2 * grid.pixel_spacing,) * 3)
        if where is None:
            continue
        labels = tissues.labels[where]
        hzs, hy, hx = tissues.frame(where)
        dist = np.sqrt((hx - centre[0]) ** 2 + (hy - centre[1]) ** 2 + (hzs - centre[2]) ** 2)
        mask = (dist <= radius) & (_is_parenchyma(labels) | (labels == Tissue.CSF))
        if not mask.any():
            continue
        rim = max(1.5, 0.25 * radius, 1.2 * grid.pixel_spacing)
        core = (dist < radius - rim) & mask if radius >= 5.0 else None
        oedema = (dist <= halo_radius) & ~mask & (labels == Tissue.WHITE)
        enhancement = WHITE_SIGNAL * (1.0 + 0.75 * difficulty.lesion_contrast * float(rng.uniform(0.9, 1.1)))
        placements.append(
            Placement(
                finding="metastasis",
                centre=patient,
                size_mm=diameter,
                where=where,
                mask=mask,
                value=enhancement,
                halo=oedema,
                core=core,
                core_value=NECROSIS_SIGNAL,
            )
        )
        taken.append((centre, radius))
    if not placements:
        raise RuntimeError("could not place any metastasis in the brain phantom")
    return placements


def render_mr(
    rng: np.random.Generator, tissues: HeadTissues, placements: list[Placement], difficulty: Difficulty
) -> npt.NDArray[np.uint16]:
    """Stored MR values (uint16, 12 bits used): tissue signal x bias field, lesions, Rician noise."""
    anatomy, grid = tissues.anatomy, tissues.grid
    table = np.array(SIGNAL_BY_TISSUE, dtype=np.float32)
    table[[Tissue.GREY, Tissue.WHITE, Tissue.CSF, Tissue.NUCLEI, Tissue.FAT]] *= 1.0 + rng.normal(
        0.0, 0.03, size=5
    )
    signal = table[tissues.labels]

    # Dural enhancement: the CSF layer right under the inner table.
    inner = tissues.inner()
    dura = (tissues.depth >= inner) & (tissues.depth < inner + max(0.8, 0.9 * grid.pixel_spacing))
    signal[dura] = np.float32(DURA_SIGNAL)

    for placement in placements:
        if placement.halo is not None:
            view = signal[placement.where]
            view[placement.halo] *= np.float32(OEDEMA_FACTOR)
    for placement in placements:
        view = signal[placement.where]
        view[placement.mask] = np.float32(placement.value)
        if placement.core is not None:
            view[placement.core] = np.float32(placement.core_value)

    # Smooth receive-coil bias: a random linear ramp across the head, ~±10% at the edges.
    spread = 0.10 * max(anatomy.axes) * (0.5 + 0.5 * min(difficulty.anatomy_variation, 2.0))
    gx, gy, gz = (rng.normal(0.0, 1.0, size=3) * spread / 100.0 / max(anatomy.axes)).astype(np.float32)
    in_plane = np.float32(1.0) + gx * tissues.hx + gy * tissues.hy
    for k in range(grid.slices):
        signal[k] *= in_plane + gz * tissues.hz[k]

    sigma = NOISE_SIGMA * difficulty.noise
    real_noise = NoiseBank(rng, grid.slices, grid.size, grid.size)
    imag_noise = NoiseBank(rng, grid.slices, grid.size, grid.size)
    stored = np.empty(grid.shape, dtype=np.uint16)
    for k in range(grid.slices):
        plane = signal[k]
        if sigma > 0:
            real = real_noise.plane(k, sigma)
            real += plane
            np.hypot(real, imag_noise.plane(k, sigma), out=plane)
        np.rint(plane, out=plane)
        np.clip(plane, 0, 4095, out=plane)
        stored[k] = plane
    return stored


def build_mr_brain(
    rng: np.random.Generator, tissues: HeadTissues, difficulty: Difficulty, positive: bool
) -> MRBrain:
    """Render one brain MR; ``positive`` studies carry at least one metastasis."""
    placements = place_metastases(rng, tissues, difficulty) if positive else []
    return MRBrain(
        grid=tissues.grid, pixels=render_mr(rng, tissues, placements, difficulty), placements=placements
    )
