"""Cheap white Gaussian noise for long series.

Drawing 16 million normals for a 64 x 512 x 512 series costs more than rendering its anatomy, so
each slice takes one of a few random noise planes, rolled by a random offset and randomly
negated. Per slice the noise is still white Gaussian with the requested sigma.
"""

from __future__ import annotations

import numpy as np

from node.synth.grid import FloatArray


class NoiseBank:
    """Noise planes for ``slices`` slices of ``rows`` x ``cols``, from ``planes`` random draws."""

    def __init__(self, rng: np.random.Generator, slices: int, rows: int, cols: int, planes: int = 8) -> None:
        count = max(1, min(planes, slices))
        self._bank = rng.standard_normal(size=(count, rows, cols), dtype=np.float32)
        self._pick = rng.integers(0, count, size=slices)
        self._shift = np.stack(
            [rng.integers(0, rows, size=slices), rng.integers(0, cols, size=slices)], axis=1
        )
        self._sign = np.where(rng.random(slices) < 0.5, np.float32(-1.0), np.float32(1.0))

    def plane(self, k: int, sigma: float) -> FloatArray:
        """The noise of slice ``k`` scaled to ``sigma`` (a new array)."""
        shifted = np.roll(self._bank[int(self._pick[k])], tuple(int(v) for v in self._shift[k]), axis=(0, 1))
        shifted *= np.float32(sigma) * self._sign[k]
        result: FloatArray = shifted
        return result
