"""PA chest radiograph phantom with multi-label findings (nodule, consolidation, effusion, cardiomegaly).

The radiograph is a projection: every structure adds water-equivalent thickness (cm) to a map,
lungs take it away (air), bone adds more. Findings act on that map the way they do physically:
a nodule or consolidation puts tissue back into the aerated lung, an effusion fills the
costophrenic angle with fluid under a meniscus, cardiomegaly widens the heart beyond half the
thoracic width. A "for presentation" image is then the log-domain map through a sigmoid tone
curve, blurred by the detector and edge-enhanced as a modality would before sending it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from node.synth.determinism import derive_rng
from node.synth.grid import BoolArray, FloatArray
from node.synth.lesions import Placement, count_between
from node.synth.spec import Difficulty

DETECTOR_MM = 430.0  # a 43 cm detector
NOISE_SIGMA = 0.008  # presentation-domain noise at Difficulty.noise == 1
TONE_CENTRE = 14.0  # water-equivalent cm shown mid-grey
TONE_SCALE = 4.0
BITS_STORED = 12


@dataclass(frozen=True)
class ChestAnatomy:
    """Per-patient chest geometry in detector millimetres (x to the image right = patient left)."""

    sex: Literal["F", "M"]
    tilt: float  # radians
    shift: tuple[float, float]
    body_half_width: float
    thickness_cm: float
    apex_y: float
    right_dome_y: float
    left_dome_y: float
    cage_half_width: float
    ctr: float  # cardiothoracic ratio
    rib_spacing: float
    rib_width: float


def sample_chest(seed: int, patient_index: int, sex: Literal["F", "M"], variation: float) -> ChestAnatomy:
    """The (normal) chest of one patient; cardiomegaly is applied later as a finding."""
    rng = derive_rng(seed, "chest", patient_index)

    def jitter(spread: float) -> float:
        return float(np.clip(rng.normal(), -2.5, 2.5)) * spread * variation

    scale = 1.0 + jitter(0.05) + (0.03 if sex == "M" else -0.03)
    apex = 62.0 + jitter(6.0)
    dome = 318.0 * scale + jitter(10.0)
    return ChestAnatomy(
        sex=sex,
        tilt=math.radians(jitter(1.5)),
        shift=(jitter(6.0), jitter(6.0)),
        body_half_width=172.0 * scale,
        thickness_cm=22.0 * scale + jitter(1.5),
        apex_y=apex,
        right_dome_y=dome,
        left_dome_y=dome + 14.0 + jitter(4.0),
        cage_half_width=142.0 * scale + jitter(4.0),
        ctr=float(np.clip(0.43 + jitter(0.02), 0.38, 0.47)),
        rib_spacing=(dome - apex) / 10.5,
        rib_width=float(np.clip(10.0 + jitter(1.0), 8.0, 12.0)),
    )


def _smooth(t: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Smoothstep of t clipped to [0, 1]."""
    c = np.clip(t, 0.0, 1.0)
    result: npt.NDArray[Any] = c * c * (3.0 - 2.0 * c)
    return result


@dataclass(frozen=True)
class ChestMaps:
    """The sampled chest: thickness map and the regions findings are placed in."""

    x: FloatArray  # detector mm, 2D
    y: FloatArray
    thickness: FloatArray  # water-equivalent cm
    lung_air: FloatArray  # cm of water the lungs' air removed
    lungs: BoolArray
    heart: BoolArray
    pixel: float


def _heart(anatomy: ChestAnatomy, x: FloatArray, y: FloatArray, ctr: float) -> tuple[FloatArray, BoolArray]:
    half = ctr * anatomy.cage_half_width  # total width = ctr * thoracic width
    cx = half / 3.0  # a third right of the midline, two thirds left
    height = 0.62 * half + 30.0
    cy = anatomy.right_dome_y - 0.55 * height
    r = ((x - cx) / half) ** 2 + ((y - cy) / height) ** 2
    soft = _smooth((1.0 - r) / 0.15)
    return soft.astype(np.float32), r <= 1.0


def sample_maps(anatomy: ChestAnatomy, size: int, texture_seed: int, ctr: float | None = None) -> ChestMaps:
    """Sample the normal chest on a ``size`` x ``size`` detector (optionally with another CTR).

    ``texture_seed`` seeds the lung markings, so two radiographs of one patient differ in detail.
    """
    pixel = DETECTOR_MM / size
    coords = (np.arange(size, dtype=np.float32) + 0.5) * pixel
    gx, gy = np.meshgrid(coords - DETECTOR_MM / 2, coords, indexing="xy")
    c, s = math.cos(anatomy.tilt), math.sin(anatomy.tilt)
    x = (c * gx + s * (gy - 215.0) - anatomy.shift[0]).astype(np.float32)
    y = (-s * gx + c * (gy - 215.0) + 215.0 - anatomy.shift[1]).astype(np.float32)
    ax = np.abs(x)

    # Body: narrow neck widening to the shoulders, then the chest wall.
    width = 55.0 + (anatomy.body_half_width + 25.0 - 55.0) * _smooth((y - 5.0) / 55.0)
    width = width - 25.0 * _smooth((y - 60.0) / 120.0)
    body = np.sqrt(np.clip(1.0 - (x / width) ** 2, 0.0, None)) * anatomy.thickness_cm
    body = body * (0.55 + 0.45 * _smooth((y - 10.0) / 80.0))

    # Lungs: apex dome, chest-wall curve, mediastinum, diaphragm domes.
    dome = np.where(x < 0, anatomy.right_dome_y, anatomy.left_dome_y).astype(np.float32)
    cage = anatomy.cage_half_width * np.sqrt(np.clip((y - anatomy.apex_y + 25.0) / 170.0, 0.0, 1.0))
    diaphragm = dome + 55.0 * (ax / anatomy.cage_half_width) ** 2.2
    medial = 30.0 + 8.0 * _smooth((y - 150.0) / 60.0)
    lateral_fit = _smooth((cage - ax) / 14.0)
    medial_fit = _smooth((ax - medial) / 10.0)
    base_fit = _smooth((diaphragm - y) / 7.0)
    apex_fit = _smooth((y - anatomy.apex_y - 0.002 * (ax - 70.0) ** 2) / 18.0)
    depth = np.sqrt(
        np.clip(
            1.0 - ((ax - 0.55 * anatomy.cage_half_width) / (0.6 * anatomy.cage_half_width)) ** 2, 0.05, 1.0
        )
    )
    lung_profile = lateral_fit * medial_fit * base_fit * apex_fit * depth

    heart_soft, heart = _heart(anatomy, x, y, anatomy.ctr if ctr is None else ctr)
    lung_profile = lung_profile * (1.0 - 0.85 * heart_soft)
    # Vascular markings: smooth random texture, denser towards the hila.
    texture = ndimage.gaussian_filter(derive_rng(texture_seed).normal(size=x.shape), sigma=4.0 / pixel)
    texture = (texture / (texture.std() + 1e-6)).astype(np.float32)
    hila = np.zeros_like(x)
    for side, dome_y in ((-1.0, anatomy.right_dome_y), (1.0, anatomy.left_dome_y)):
        hila += np.exp(-(((x - side * 62.0) / 28.0) ** 2 + ((y - dome_y + 150.0) / 40.0) ** 2))
    lung_air = (
        0.75 * 0.62 * anatomy.thickness_cm * lung_profile * (1.0 - 0.06 * texture - 0.25 * hila)
    ).astype(np.float32)

    bone = _ribs(anatomy, x, y, ax) + _spine_and_clavicles(anatomy, x, y, ax)
    mediastinum = 2.0 * np.exp(-(((x - 28.0) ** 2 + (y - 140.0) ** 2) / (2 * 14.0**2)))  # aortic knob
    trachea = -2.5 * _smooth((9.0 - ax) / 3.0) * _smooth((150.0 - y) / 10.0)
    bubble = -3.0 * np.exp(-(((x - 75.0) / 24.0) ** 2 + ((y - anatomy.left_dome_y - 28.0) / 14.0) ** 2))
    breasts = np.zeros_like(x)
    if anatomy.sex == "F":
        for side in (-1.0, 1.0):
            breasts += 2.5 * np.exp(
                -(((x - side * 95.0) / 60.0) ** 2 + ((y - anatomy.right_dome_y + 30.0) / 45.0) ** 2)
            )
    thickness = (body - lung_air + bone + mediastinum + trachea + bubble + breasts).astype(np.float32)
    thickness = np.clip(thickness, 0.0, None) * (body > 0)
    return ChestMaps(
        x=x,
        y=y,
        thickness=thickness.astype(np.float32),
        lung_air=lung_air,
        lungs=lung_profile > 0.35,
        heart=heart,
        pixel=pixel,
    )


def _ribs(anatomy: ChestAnatomy, x: FloatArray, y: FloatArray, ax: FloatArray) -> FloatArray:
    """Posterior ribs arch down laterally; fainter anterior ribs run down towards the sternum."""
    out = np.zeros_like(x)
    half = anatomy.rib_width / 2
    inside = ax < anatomy.cage_half_width + 8.0
    for i in range(10):
        start = anatomy.apex_y - 18.0 + i * anatomy.rib_spacing
        u = ax - 18.0
        centre = start - 0.16 * u + 0.0026 * u * u
        d = np.abs(y - centre) / (half * (1.0 + 0.004 * u))
        profile = np.clip(1.0 - d * d, 0.0, None) * 0.7 + (np.abs(d - 0.85) < 0.15) * 0.6
        out += (profile * (u > 0) * inside).astype(np.float32)
        front = start + 40.0 + 0.35 * (anatomy.cage_half_width - ax)
        d2 = np.abs(y - front) / (0.8 * half)
        out += (0.35 * np.clip(1.0 - d2 * d2, 0.0, None) * (ax > 55.0) * inside).astype(np.float32)
    return out


def _spine_and_clavicles(anatomy: ChestAnatomy, x: FloatArray, y: FloatArray, ax: FloatArray) -> FloatArray:
    spine = 1.3 * _smooth((22.0 - ax) / 4.0)
    discs = 1.0 - 0.35 * (np.mod(y + 7.0, 27.0) < 5.0)
    out = spine * discs
    for side in (-1.0, 1.0):
        t = np.clip((x * side - 20.0) / 130.0, 0.0, 1.0)
        centre = anatomy.apex_y - 8.0 - 28.0 * t + 18.0 * t * t
        d = np.abs(y - centre) / 7.0
        out = out + 2.2 * np.clip(1.0 - d * d, 0.0, None) * ((x * side) > 15.0) * ((x * side) < 160.0)
    return out.astype(np.float32)


@dataclass(frozen=True)
class ChestRadiograph:
    """A rendered PA chest: stored 12-bit pixels and the findings placed (masks on the image)."""

    pixels: npt.NDArray[np.uint16]
    placements: list[Placement]
    pixel_spacing: float
    ctr: float


def _disc_centre(rng: np.random.Generator, maps: ChestMaps, radius_mm: float) -> tuple[int, int] | None:
    inner = ndimage.distance_transform_edt(maps.lungs) * maps.pixel
    rows, cols = np.nonzero(inner >= max(radius_mm, 2 * maps.pixel))
    if rows.size == 0:
        return None
    pick = int(rng.integers(rows.size))
    return int(rows[pick]), int(cols[pick])


def _nodule(
    rng: np.random.Generator, maps: ChestMaps, size: float, contrast: float
) -> tuple[Placement, FloatArray] | None:
    diameter = max(size, 3.0 * maps.pixel)
    radius = diameter / 2
    centre = _disc_centre(rng, maps, radius)
    if centre is None:
        return None
    cx, cy = maps.x[centre], maps.y[centre]
    rho2 = (maps.x - cx) ** 2 + (maps.y - cy) ** 2
    mask = rho2 <= radius * radius
    extra = contrast * (1.2 + 0.075 * diameter) * np.sqrt(np.clip(1.0 - rho2 / (radius * radius), 0.0, None))
    full = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    return Placement("nodule", (float(cx), float(cy)), diameter, full, mask, 0.0), extra.astype(np.float32)


def _consolidation(
    rng: np.random.Generator, maps: ChestMaps, size: float, contrast: float
) -> tuple[Placement, FloatArray] | None:
    extent = max(2.5 * size, 25.0)
    centre = _disc_centre(rng, maps, 0.15 * extent)
    if centre is None:
        return None
    cx, cy = float(maps.x[centre]), float(maps.y[centre])
    field = np.zeros_like(maps.x)
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0.0, 0.3 * extent, size=2)
        sigma = float(rng.uniform(0.2, 0.35)) * extent
        field += np.exp(-(((maps.x - cx - ox) ** 2 + (maps.y - cy - oy) ** 2) / (2 * sigma * sigma)))
    soft = _smooth((field - 0.3) / 0.9)
    mask = (soft > 0.25) & maps.lungs
    if not mask.any():
        return None
    patches = ndimage.gaussian_filter(rng.normal(size=field.shape), sigma=3.0 / maps.pixel)
    patches = patches / (patches.std() + 1e-6)
    extra = contrast * 0.6 * maps.lung_air * soft * np.clip(0.8 + 0.25 * patches, 0.3, 1.2)
    full = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    return Placement("consolidation", (cx, cy), extent, full, mask, 0.0), extra.astype(np.float32)


def _effusion(
    rng: np.random.Generator, maps: ChestMaps, size: float, contrast: float
) -> tuple[Placement, FloatArray] | None:
    side = -1.0 if rng.random() < 0.5 else 1.0
    own = maps.lungs & ((maps.x * side) > 0)
    if not own.any():
        return None
    rows = np.nonzero(own.any(axis=1))[0]
    bottom = float(maps.y[rows[-1], 0])
    cols = np.nonzero(own.any(axis=0))[0]
    xs = maps.x[0, cols]
    lateral, medial = float(np.max(np.abs(xs))), float(np.min(np.abs(xs)))
    height = min(max(2.5 * size, 30.0), 130.0)
    u = np.clip((np.abs(maps.x) - medial) / max(lateral - medial, 1.0), 0.0, 1.0)
    top = bottom - height - 0.45 * height * u * u  # meniscus: higher against the chest wall
    soft = _smooth((maps.y - top) / 12.0) * ((maps.x * side) > 0)
    mask = own & (maps.y > top + 3.0)
    if not mask.any():
        return None
    extra = contrast * 0.9 * maps.lung_air * soft
    full = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    centre = (side * (medial + lateral) / 2, bottom - height / 2)
    return Placement("effusion", centre, height, full, mask, 0.0), extra.astype(np.float32)


def build_cxr(
    rng: np.random.Generator, anatomy: ChestAnatomy, size: int, difficulty: Difficulty, positive: bool
) -> ChestRadiograph:
    """Render one PA chest; a positive study carries ``lesion_count`` findings of random types."""
    contrast = difficulty.lesion_contrast
    chosen: list[str] = []
    if positive:
        for _ in range(count_between(rng, difficulty.lesion_count)):
            finding = str(rng.choice(["nodule", "nodule", "consolidation", "effusion", "cardiomegaly"]))
            if finding in ("cardiomegaly", "effusion") and finding in chosen:
                finding = "nodule"
            chosen.append(finding)

    ctr = anatomy.ctr
    if "cardiomegaly" in chosen:
        ctr = float(np.clip(0.52 + 0.06 * contrast + rng.normal(0.0, 0.015), 0.52, 0.7))
    maps = sample_maps(anatomy, size, int(rng.integers(1 << 62)), ctr)
    placements: list[Placement] = []
    extra = np.zeros_like(maps.thickness)
    builders = {"nodule": _nodule, "consolidation": _consolidation, "effusion": _effusion}
    for finding in chosen:
        if finding == "cardiomegaly":
            full = (slice(0, size), slice(0, size))
            placements.append(
                Placement(
                    "cardiomegaly",
                    (ctr * anatomy.cage_half_width / 3.0, anatomy.right_dome_y),
                    2 * ctr * anatomy.cage_half_width,
                    full,
                    maps.heart,
                    0.0,
                )
            )
            continue
        for _ in range(8):
            lesion_size = float(rng.uniform(*difficulty.lesion_size_mm))
            made = builders[finding](rng, maps, lesion_size, contrast)
            if made is not None and made[0].voxels > 0:
                placements.append(made[0])
                extra += made[1]
                break
    if positive and not placements:
        made = _nodule(rng, maps, max(difficulty.lesion_size_mm[1], 10.0), contrast)
        if made is None:
            raise RuntimeError("could not place any finding in the chest phantom")
        placements.append(made[0])
        extra += made[1]

    thickness = maps.thickness + extra
    image = 1.0 / (1.0 + np.exp(-(thickness - TONE_CENTRE) / TONE_SCALE))
    image = ndimage.gaussian_filter(image, sigma=0.7, mode="nearest")
    blurred = ndimage.gaussian_filter(image, sigma=6.0 / maps.pixel, mode="nearest")
    image = image + 0.5 * (image - blurred)  # unsharp masking, as a modality's processing would
    sigma = NOISE_SIGMA * difficulty.noise
    if sigma > 0:
        image = image + rng.normal(0.0, sigma, size=image.shape) * np.sqrt(np.clip(image, 0.05, 1.0))
    top = (1 << BITS_STORED) - 1
    pixels = np.clip(np.rint(image * top), 0, top).astype(np.uint16)
    return ChestRadiograph(pixels=pixels, placements=placements, pixel_spacing=maps.pixel, ctr=ctr)
