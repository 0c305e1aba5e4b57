"""A key image as PNG, rendered on the node for the study page: the slice in the window the model
read it in, with the outline of every segmented lesion on it drawn in colour.

Why on the server: the page runs no script and loads nothing from elsewhere (its
Content-Security-Policy), and a reading-room browser cannot decode DICOM. The mapping follows the
model's input: a CT slice through its first window in Hounsfield units (the modality LUT applied
first), any other image through robust percentiles (0.5 %, 99.5 %), MONOCHROME1 inverted, the
mapping every non-CT model input uses. Small images are enlarged by whole pixels (nearest
neighbour) so that an outline stays one crisp source pixel wide.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_rescale, pixel_array

from node.messages import DisplayWindow

MIN_SIDE = 384  # px: enlarged to at least this, by a whole factor
PERCENTILES = (0.5, 99.5)
# One colour per segment (lesion), repeating; chosen to stand out on grey.
OUTLINE_COLOURS = ((255, 64, 64), (255, 200, 0), (0, 200, 255), (120, 255, 80), (255, 100, 255))


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 4-neighbour cross, outside the image counted as background: what
    ``scipy.ndimage.binary_erosion`` does by default, without importing scipy into the node."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


class RenderError(ValueError):
    """The key image cannot be rendered; the message says why (shown instead of the picture)."""


def _grey(ds: pydicom.Dataset, frame: int, frames: int, window: DisplayWindow | None) -> np.ndarray:
    """The frame as float in [0, 1], as the model saw it (only that frame is decoded)."""
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} is outside 1-{frames}")
    pixels = pixel_array(ds, index=frame - 1) if frames > 1 else ds.pixel_array
    if pixels.ndim != 2:
        raise RenderError(f"only greyscale images are rendered, got pixel shape {pixels.shape}")
    values = apply_rescale(pixels, ds).astype(np.float64)
    if window is not None:
        return np.clip((values - (window.centre - window.width / 2)) / window.width, 0.0, 1.0)
    low, high = np.percentile(values, PERCENTILES)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    return 1.0 - scaled if ds.get("PhotometricInterpretation") == "MONOCHROME1" else scaled


def _masks(seg_path: Path, sop_uid: str, frame: int, multi_frame: bool) -> np.ndarray:
    """(rows, columns, segments) masks of one SEG on the source frame; no segment where the SEG does
    not cover it."""
    import highdicom as hd  # here, not at the top: 20 MB of the node's memory, for study pages with a SEG only

    seg = hd.seg.segread(seg_path)
    try:
        if multi_frame:
            pixels = seg.get_pixels_by_source_frame(sop_uid, [frame], ignore_spatial_locations=True,
                                                    assert_missing_frames_are_empty=True)
        else:
            pixels = seg.get_pixels_by_source_instance([sop_uid], ignore_spatial_locations=True,
                                                       assert_missing_frames_are_empty=True)
    except (KeyError, ValueError, IndexError):  # the SEG does not reference this image
        return np.zeros((0, 0, 0), dtype=bool)
    return np.asarray(pixels[0]) > 0


def render_key_image(path: Path, frame: int, window: DisplayWindow | None, seg_paths: Sequence[Path] = ()) -> bytes:
    """PNG bytes of ``frame`` (1-based) of the image at ``path``, outlines of ``seg_paths`` drawn on it."""
    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        grey = _grey(ds, frame, frames, window)
    except (OSError, pydicom.errors.InvalidDicomError, AttributeError, NotImplementedError, RuntimeError) as exc:
        raise RenderError(f"image not readable: {type(exc).__name__}: {exc}") from exc
    rgb = np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    colour = 0
    for seg_path in seg_paths:
        try:
            masks = _masks(seg_path, str(ds.SOPInstanceUID), frame, frames > 1)
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
            raise RenderError(f"segmentation not readable: {type(exc).__name__}: {exc}") from exc
        if masks.shape[:2] != grey.shape:
            continue
        for k in range(masks.shape[2]):
            inside = masks[..., k]
            outline = inside & ~_eroded(inside)
            rgb[outline] = OUTLINE_COLOURS[colour % len(OUTLINE_COLOURS)]
            colour += 1
    factor = max(1, -(-MIN_SIDE // max(rgb.shape[:2])))
    if factor > 1:
        rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
