"""Voxel geometry of an axial series in patient coordinates (DICOM LPS, millimetres).

The phantoms are defined analytically in millimetres and sampled on this grid, so the DICOM Image
Plane attributes written later are the same numbers the pixels were computed from: a lesion's
mask, its reported volume and the SEG's plane positions can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class AxialGrid:
    """``slices`` x ``size`` x ``size`` voxels; array index ``[k, row, col]`` is (z, y, x).

    Rows run posterior (+y), columns run to the patient's left (+x), slices run superior (+z),
    so ImageOrientationPatient is ``1\\0\\0\\0\\1\\0`` and ImagePositionPatient increases with k.
    """

    size: int
    slices: int
    pixel_spacing: float
    slice_spacing: float
    x0: float  # x of the centre of column 0
    y0: float  # y of the centre of row 0
    z0: float  # z of the centre of slice 0

    @classmethod
    def centred(cls, size: int, slices: int, fov_mm: float, z_start: float, z_end: float) -> AxialGrid:
        """A square field of view centred on x = y = 0 covering ``[z_start, z_end]`` contiguously."""
        if size < 16 or slices < 1:
            raise ValueError("an axial grid needs size >= 16 and at least one slice")
        pixel = fov_mm / size
        thickness = (z_end - z_start) / slices
        return cls(
            size=size,
            slices=slices,
            pixel_spacing=pixel,
            slice_spacing=thickness,
            x0=-fov_mm / 2 + pixel / 2,
            y0=-fov_mm / 2 + pixel / 2,
            z0=z_start + thickness / 2,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.size, self.size)

    @property
    def voxel_volume(self) -> float:
        """mm^3 of one voxel (slices are contiguous: thickness equals spacing)."""
        return self.pixel_spacing * self.pixel_spacing * self.slice_spacing

    def x(self) -> FloatArray:
        return (self.x0 + self.pixel_spacing * np.arange(self.size)).astype(np.float32)

    def y(self) -> FloatArray:
        return (self.y0 + self.pixel_spacing * np.arange(self.size)).astype(np.float32)

    def z(self) -> FloatArray:
        return (self.z0 + self.slice_spacing * np.arange(self.slices)).astype(np.float32)

    def slice_index(self, z: float) -> int:
        """Nearest slice to height ``z`` (clamped)."""
        return int(np.clip(round((z - self.z0) / self.slice_spacing), 0, self.slices - 1))

    def snap(self, point: tuple[float, float, float]) -> tuple[float, float, float]:
        """Move a point onto the nearest voxel centre, so a lesion centred there is never missed."""
        k, row, col = self.index_of(point)
        return (
            self.x0 + col * self.pixel_spacing,
            self.y0 + row * self.pixel_spacing,
            self.z0 + k * self.slice_spacing,
        )

    def index_of(self, point: tuple[float, float, float]) -> tuple[int, int, int]:
        """(slice, row, column) of the voxel nearest to a patient point (clamped)."""
        x, y, z = point
        col = int(np.clip(round((x - self.x0) / self.pixel_spacing), 0, self.size - 1))
        row = int(np.clip(round((y - self.y0) / self.pixel_spacing), 0, self.size - 1))
        return (self.slice_index(z), row, col)

    def box(
        self, centre: tuple[float, float, float], radius: tuple[float, float, float]
    ) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels within ``radius`` (x, y, z, mm) of ``centre``; None if outside."""
        (cx, cy, cz), (rx, ry, rz) = centre, radius

        def span(centre_mm: float, r: float, origin: float, step: float, n: int) -> slice | None:
            lo = int(np.floor((centre_mm - r - origin) / step))
            hi = int(np.ceil((centre_mm + r - origin) / step)) + 1
            lo, hi = max(lo, 0), min(hi, n)
            return slice(lo, hi) if lo < hi else None

        ks = span(cz, rz, self.z0, self.slice_spacing, self.slices)
        rows = span(cy, ry, self.y0, self.pixel_spacing, self.size)
        cols = span(cx, rx, self.x0, self.pixel_spacing, self.size)
        if ks is None or rows is None or cols is None:
            return None
        return (ks, rows, cols)

    def coords(self, where: tuple[slice, slice, slice]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Broadcastable (z, y, x) coordinate arrays of a box: shapes (k,1,1), (1,r,1), (1,1,c)."""
        ks, rows, cols = where
        return (
            self.z()[ks][:, None, None],
            self.y()[rows][None, :, None],
            self.x()[cols][None, None, :],
        )

    def full(self) -> tuple[slice, slice, slice]:
        return (slice(0, self.slices), slice(0, self.size), slice(0, self.size))
