"""A head phantom shared by head CT and brain MR: scalp, skull, CSF spaces, cortex, white matter.

The anatomy is a handful of analytic shapes in millimetres (an ellipsoidal skull, a sulcal
pattern from a few plane waves, banana-shaped lateral ventricles), sampled per patient, so the
CT and the MR of one patient show the same head. Sampling yields a tissue label map; each
modality turns labels into intensities with a lookup table, which keeps rendering cheap enough
for thousands of 512x512 slices.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from node.synth.determinism import derive_rng
from node.synth.grid import AxialGrid, FloatArray

LabelArray = npt.NDArray[np.uint8]

# The slab that head CT / brain MR series cover, relative to the centre of the skull (mm): from
# the skull base to just above the vertex. Field of view of the axial images.
SLAB_Z = (-32.0, 82.0)
HEAD_FOV_MM = 240.0


class Tissue(enum.IntEnum):
    """Labels of the head label map; modalities map them to HU or MR signal."""

    AIR = 0
    SKIN = 1
    FAT = 2
    BONE = 3  # cortical tables
    DIPLOE = 4  # marrow between the tables
    CSF = 5  # extra-axial, sulcal and fissural CSF (where subarachnoid blood goes)
    GREY = 6
    WHITE = 7
    VENTRICLE = 8
    NUCLEI = 9  # deep grey matter


@dataclass(frozen=True)
class HeadAnatomy:
    """Per-patient head geometry (mm, radians). Axes are the outer skull's semi-axes (x, y, z)."""

    centre: tuple[float, float, float]
    yaw: float
    axes: tuple[float, float, float]
    scalp: float
    skull: float
    csf_gap: float
    cortex: float
    sulcus_width: float
    sulcus_depth: float
    sulcus_waves: tuple[tuple[float, float, float, float], ...]  # (kx, ky, kz, phase)
    fissure_width: float
    ventricle_offset: tuple[float, float, float]  # centre of the lateral ventricles from the head centre
    ventricle_axes: tuple[float, float, float]  # semi-axes of one lateral ventricle
    ventricle_separation: float  # x distance of each lateral ventricle from the midline
    ventricle_bend: float  # curvature (1/mm) of the ventricles' banana shape


def sample_head(seed: int, patient_index: int, variation: float) -> HeadAnatomy:
    """The head of one patient; ``variation`` scales every deviation from the average head."""
    rng = derive_rng(seed, "head", patient_index)

    def jitter(spread: float) -> float:
        return float(np.clip(rng.normal(0.0, 1.0), -2.5, 2.5)) * spread * variation

    scale = 1.0 + jitter(0.05)
    waves = []
    wavelength = float(rng.uniform(20.0, 26.0))
    for _ in range(5):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = direction * (2 * np.pi / wavelength)
        waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi))))
    atrophy = float(np.clip(1.0 + jitter(0.2), 0.6, 1.8))
    return HeadAnatomy(
        centre=(jitter(4.0), jitter(6.0), jitter(3.0)),
        yaw=np.deg2rad(jitter(4.0)),
        axes=(72.0 * scale * (1 + jitter(0.03)), 92.0 * scale * (1 + jitter(0.03)), 86.0 * scale),
        scalp=float(np.clip(5.0 + jitter(1.0), 3.0, 8.0)),
        skull=float(np.clip(6.5 + jitter(1.0), 4.5, 9.0)),
        csf_gap=float(np.clip(2.0 + jitter(0.6) + 0.8 * (atrophy - 1), 1.0, 4.0)),
        cortex=float(np.clip(3.5 + jitter(0.5), 2.5, 5.0)),
        sulcus_width=float(np.clip(1.4 + 0.8 * (atrophy - 1) + jitter(0.2), 0.8, 3.0)),
        sulcus_depth=float(np.clip(12.0 + jitter(2.0), 8.0, 16.0)),
        sulcus_waves=tuple(waves),
        fissure_width=float(np.clip(2.5 + (atrophy - 1) * 2, 1.5, 5.0)),
        ventricle_offset=(0.0, jitter(3.0) - 4.0, 18.0 + jitter(3.0)),
        ventricle_axes=(5.5 * atrophy, 27.0 * (1 + jitter(0.08)), 11.0 * (0.5 + 0.5 * atrophy)),
        ventricle_separation=7.0 + 2.0 * atrophy,
        ventricle_bend=0.006 * (1 + jitter(0.2)),
    )


def head_grid(size: int, slices: int) -> AxialGrid:
    """The axial grid of a head CT / brain MR series: 240 mm FOV, skull base to vertex."""
    return AxialGrid.centred(size, slices, HEAD_FOV_MM, *SLAB_Z)


@dataclass(frozen=True)
class HeadTissues:
    """A head sampled on a grid: labels, depth below the skull surface, head-frame coordinates.

    ``hx``/``hy`` (rows x cols) are in-plane head-frame coordinates (x: left, y: posterior) and
    ``hz`` (slices) the height above the head centre; lesion builders use them to place shapes
    relative to the anatomy rather than to the image.
    """

    anatomy: HeadAnatomy
    grid: AxialGrid
    labels: LabelArray
    depth: FloatArray
    hx: FloatArray
    hy: FloatArray
    hz: FloatArray

    def inner(self) -> float:
        """Depth (mm below the outer skull surface) of the inner table."""
        return self.anatomy.skull

    def brain_depth(self) -> float:
        """Depth of the brain surface; the CSF layer above it is kept at least 1.6 pixels thick."""
        return brain_depth(self.anatomy, self.grid)

    def to_patient(self, hx: float, hy: float, hz: float) -> tuple[float, float, float]:
        """Head-frame point -> patient (LPS) coordinates."""
        (cx, cy, cz), yaw = self.anatomy.centre, self.anatomy.yaw
        c, s = np.cos(yaw), np.sin(yaw)
        return (cx + c * hx - s * hy, cy + s * hx + c * hy, cz + hz)

    def from_patient(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Patient (LPS) coordinates -> head-frame point."""
        (cx, cy, cz), yaw = self.anatomy.centre, self.anatomy.yaw
        c, s = np.cos(yaw), np.sin(yaw)
        dx, dy = x - cx, y - cy
        return (c * dx + s * dy, -s * dx + c * dy, z - cz)

    def frame(self, where: tuple[slice, slice, slice]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Head-frame (z, y, x) coordinates of a box, broadcastable: (k,1,1), (1,r,c), (1,r,c)."""
        ks, rows, cols = where
        return (self.hz[ks][:, None, None], self.hy[rows, cols][None], self.hx[rows, cols][None])

    def depth_at(self, hx: float, hy: float, hz: float) -> float:
        """Depth below the outer skull surface of one head-frame point (negative outside)."""
        a, b, c = self.anatomy.axes
        r = np.sqrt((hx / a) ** 2 + (hy / b) ** 2 + (hz / c) ** 2)
        rho = np.sqrt(hx * hx + hy * hy + hz * hz)
        return float(rho / max(r, 1e-6) - rho)

    def surface_point(self, hz: float, angle: float, depth: float) -> tuple[float, float] | None:
        """The in-plane head-frame point at height ``hz``, azimuth ``angle``, ``depth`` below the skull.

        Found by bisection along the ray from the axis; None when that depth is not reached there
        (near the vertex).
        """
        ux, uy = float(np.cos(angle)), float(np.sin(angle))
        if self.depth_at(0.0, 0.0, hz) < depth:
            return None
        lo, hi = 0.0, 200.0  # depth decreases monotonically along the ray
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.depth_at(ux * mid, uy * mid, hz) > depth:
                lo = mid
            else:
                hi = mid
        return (ux * lo, uy * lo)


def brain_depth(anatomy: HeadAnatomy, grid: AxialGrid) -> float:
    """Depth of the brain surface below the outer skull surface on ``grid``."""
    return anatomy.skull + max(anatomy.csf_gap, 1.6 * grid.pixel_spacing)


def _fill_ellipsoid(
    tissues: HeadTissues,
    centre: tuple[float, float, float],
    axes: tuple[float, float, float],
    value: Tissue,
    bend: float = 0.0,
    only_brain: bool = False,
) -> None:
    """Label the voxels of a (possibly banana-bent) head-frame ellipsoid, within its own box."""
    a, b, c = axes
    reach = max(a, b) + 2 * tissues.grid.pixel_spacing
    where = tissues.grid.box(
        tissues.to_patient(*centre), (reach, reach, c + bend * b * b + tissues.grid.slice_spacing)
    )
    if where is None:
        return
    hz, hy, hx = tissues.frame(where)
    cx, cy, cz = centre
    dz = hz - cz - bend * (hy - cy) ** 2
    inside = ((hx - cx) / a) ** 2 + ((hy - cy) / b) ** 2 + (dz / c) ** 2 <= 1.0
    region = tissues.labels[where]
    if only_brain:
        inside &= region >= Tissue.GREY
    region[inside] = value


def sample_tissues(anatomy: HeadAnatomy, grid: AxialGrid) -> HeadTissues:
    """Sample the head on ``grid``: a label map and the depth field the lesions are placed with."""
    (cx, cy, cz), yaw = anatomy.centre, anatomy.yaw
    c, s = np.float32(np.cos(yaw)), np.float32(np.sin(yaw))
    dx = grid.x()[None, :] - np.float32(cx)
    dy = grid.y()[:, None] - np.float32(cy)
    hx = (c * dx + s * dy).astype(np.float32)
    hy = (-s * dx + c * dy).astype(np.float32)
    hz = (grid.z() - np.float32(cz)).astype(np.float32)

    a, b, cc = anatomy.axes
    q2 = (hx / np.float32(a)) ** 2 + (hy / np.float32(b)) ** 2
    rho2 = hx * hx + hy * hy

    pixel = grid.pixel_spacing
    skin = max(1.5, pixel)
    brain = brain_depth(anatomy, grid)
    cortex = max(anatomy.cortex, 1.5 * pixel)
    edges = np.array(
        [
            -anatomy.scalp,
            -anatomy.scalp + skin,
            0.0,
            0.3 * anatomy.skull,
            0.7 * anatomy.skull,
            anatomy.skull,
            brain,
            brain + cortex,
        ],
        dtype=np.float32,
    )
    layer_labels = np.array(
        [
            Tissue.AIR,
            Tissue.SKIN,
            Tissue.FAT,
            Tissue.BONE,
            Tissue.DIPLOE,
            Tissue.BONE,
            Tissue.CSF,
            Tissue.GREY,
            Tissue.WHITE,
        ],
        dtype=np.uint8,
    )
    # Slice by slice: the working set of one slice stays in cache, several times faster than
    # whole-volume passes on 64 x 512 x 512 series.
    depth = np.empty(grid.shape, dtype=np.float32)
    labels: LabelArray = np.empty(grid.shape, dtype=np.uint8)
    for k in range(grid.slices):
        zk = np.float32(hz[k])
        r = np.sqrt(q2 + (zk / np.float32(cc)) ** 2)
        rho = np.sqrt(rho2 + zk * zk)
        np.maximum(r, np.float32(1e-6), out=r)
        plane = depth[k]
        np.divide(rho, r, out=plane)
        plane -= rho
        labels[k] = layer_labels[np.searchsorted(edges, plane, side="right")]

    tissues = HeadTissues(anatomy=anatomy, grid=grid, labels=labels, depth=depth, hx=hx, hy=hy, hz=hz)
    _carve_sulci(tissues, brain, cortex)
    _carve_midline_and_ventricles(tissues, brain)
    return tissues


def _carve_sulci(tissues: HeadTissues, brain: float, cortex: float) -> None:
    """Sulci: thin CSF sheets where a sum of plane waves crosses zero, within the cortical band."""
    anatomy, grid = tissues.anatomy, tissues.grid
    k_norm = float(np.linalg.norm(anatomy.sulcus_waves[0][:3]))
    width = max(anatomy.sulcus_width, 1.2 * grid.pixel_spacing)
    # |field| grows about 1.2 |k| per mm away from its zero set: half-width in field units.
    threshold = np.float32(0.6 * width * k_norm)
    reach = np.float32(cortex + anatomy.sulcus_depth)
    in_plane = [
        np.float32(kx) * tissues.hx + np.float32(ky) * tissues.hy for kx, ky, _, _ in anatomy.sulcus_waves
    ]
    for k in range(grid.slices):
        plane = tissues.depth[k]
        rows, cols = np.nonzero((plane >= brain) & (plane < brain + reach))
        if rows.size == 0:
            continue
        field = np.zeros(rows.size, dtype=np.float32)
        for wave, (_, _, kz, phase) in zip(in_plane, anatomy.sulcus_waves, strict=True):
            field += np.cos(wave[rows, cols] + np.float32(kz * float(tissues.hz[k]) + phase))
        # Sulci taper: full width at the surface, closing with depth.
        taper = np.clip(1.0 - (plane[rows, cols] - np.float32(brain)) / reach, 0.0, 1.0)
        sulcus = np.abs(field) < threshold * (0.35 + 0.65 * taper)
        tissues.labels[k, rows[sulcus], cols[sulcus]] = Tissue.CSF


def _carve_midline_and_ventricles(tissues: HeadTissues, brain: float) -> None:
    """Interhemispheric fissure, deep grey nuclei, lateral and third ventricles."""
    anatomy, grid = tissues.anatomy, tissues.grid
    labels = tissues.labels

    # Fissure: a midline CSF cleft from the surface down to ~25 mm, above the ventricles.
    fissure_half = max(anatomy.fissure_width, 1.5 * grid.pixel_spacing) / 2
    near_mid = np.abs(tissues.hx) < fissure_half
    rows, cols = np.nonzero(near_mid)
    if rows.size:
        sub = tissues.depth[:, rows, cols]
        cut = (sub >= brain) & (sub < brain + 28.0)
        column = labels[:, rows, cols]
        column[cut] = Tissue.CSF
        labels[:, rows, cols] = column

    _, vy, vz = anatomy.ventricle_offset
    va, vb, vc = anatomy.ventricle_axes
    sep = anatomy.ventricle_separation
    for side in (-1.0, 1.0):
        _fill_ellipsoid(
            tissues,
            (side * (sep + 10.0), vy - 4.0, vz - 12.0),
            (8.0, 13.0, 9.0),
            Tissue.NUCLEI,
            only_brain=True,
        )
    for side in (-1.0, 1.0):
        _fill_ellipsoid(
            tissues, (side * sep, vy, vz), (va, vb, vc), Tissue.VENTRICLE, bend=anatomy.ventricle_bend
        )
    third = (max(1.6, grid.pixel_spacing), 12.0, 7.0)
    _fill_ellipsoid(tissues, (0.0, vy + 2.0, vz - 14.0), third, Tissue.VENTRICLE)
