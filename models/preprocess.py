"""One DICOM frame (or a mask on its pixel grid) to network input, and a predicted mask back.

Finetuning and the inference workers both call these functions, on a path or on a pydicom
``Dataset`` read from the node's store, so a model sees at inference exactly the pixels it was
trained on. Nothing is re-implemented here: decoding, normalisation and the letterbox come from
:func:`pretrain.decode.prepare_image` (the pretraining path, so the finetuned encoder sees what it
was pretrained on), the stored-encoding round trip from :mod:`pretrain.shards`, and windowing and
the final resampling from :func:`pretrain.augment.eval_view`.

Masks follow the image's geometry. :func:`mask_input` letterboxes a source-grid mask with
:func:`pretrain.decode.resize_square` and the aspect :func:`pretrain.decode.pixel_aspect` reads,
the same two calls ``prepare_image`` makes, so mask and image pixels line up by construction;
:func:`mask_output` undoes the letterbox (crop the padding, resize back) so a prediction can be
written as a SEG on the source image's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset

from node.messages import DisplayWindow
from pretrain.augment import DEFAULT_CT_WINDOWS, NAMED_CT_WINDOWS, eval_view
from pretrain.decode import PixelDataError, pixel_aspect, prepare_image, read_dataset, resize_square
from pretrain.shards import decode_hu, decode_unit

__all__ = [
    "InputSpec",
    "PixelDataError",
    "Window",
    "image_input",
    "letterbox_box",
    "mask_input",
    "mask_output",
    "neighbour_picks",
    "stack_neighbours",
]

# A resampled mask value at or above this is inside: bilinear weights split an edge pixel evenly.
MASK_THRESHOLD = 0.5


class Window(DisplayWindow):
    """A CT window in Hounsfield units, under the name radiologists give it (the fields and their
    checks are :class:`node.messages.DisplayWindow`'s, which carries a key image's window to the node)."""

    @classmethod
    def named(cls, name: str) -> Window:
        """One of :data:`pretrain.augment.NAMED_CT_WINDOWS` (brain, subdural, bone, ...)."""
        if name not in NAMED_CT_WINDOWS:
            raise ValueError(f"unknown CT window {name!r}; known: {', '.join(NAMED_CT_WINDOWS)}")
        centre, width = NAMED_CT_WINDOWS[name]
        return cls(name=name, centre=centre, width=width)


UNIT_MAPPING = "robust percentiles (0.5 %, 99.5 %) to [0, 1], MONOCHROME1 inverted"


class InputSpec(BaseModel):
    """What a model's input is, channel by channel; stored in its model card, so that training,
    evaluation, inference and the SR's evidence all build exactly this input.

    ``size`` is the letterboxed working size. Per slice there are ``channels`` channels: for CT one
    per window of ``windows`` (by name and HU; ``None`` means the first ``channels`` of
    :data:`pretrain.augment.DEFAULT_CT_WINDOWS`, what a pretrained encoder with that many channels
    saw), for every other image the intensity of :data:`UNIT_MAPPING` replicated. ``neighbours``
    makes the input 2.5D: that many slices on each side of a slice bring their own channels
    (edges repeat the end slice), in slice order, so the network gets ``in_channels`` in all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(default=256, ge=8, le=4096)
    channels: int = Field(default=1, ge=1)
    windows: tuple[Window, ...] | None = None
    neighbours: int = Field(default=0, ge=0, le=4)

    @classmethod
    def ct(cls, size: int, windows: list[str], neighbours: int = 0) -> InputSpec:
        """A CT input of the named windows (one channel each)."""
        return cls(size=size, channels=len(windows), windows=tuple(Window.named(w) for w in windows),
                   neighbours=neighbours)

    @model_validator(mode="after")
    def _windows_fit_channels(self) -> InputSpec:
        # Checked here, not at the first CT image: a spec is written into a model card at training
        # time and must not turn out unusable when inference first meets a CT.
        if self.windows is None:
            if self.channels > len(DEFAULT_CT_WINDOWS):
                raise ValueError(
                    f"channels={self.channels} but only {len(DEFAULT_CT_WINDOWS)} default CT windows exist: "
                    "give one window per channel"
                )
        elif len(self.windows) != self.channels:
            raise ValueError(
                f"windows must give one window per channel: {self.channels} channels, {len(self.windows)} windows"
            )
        return self

    @property
    def in_channels(self) -> int:
        """The network's input channels: per-slice channels times the slices stacked."""
        return self.channels * (2 * self.neighbours + 1)

    def ct_windows(self) -> list[Window]:
        """The windows CT channels show, default ones included."""
        if self.windows is not None:
            return list(self.windows)
        names = {value: name for name, value in NAMED_CT_WINDOWS.items()}
        return [Window(name=names[pair], centre=pair[0], width=pair[1]) for pair in DEFAULT_CT_WINDOWS[: self.channels]]

    def window_pairs(self) -> list[tuple[float, float]]:
        return [(w.centre, w.width) for w in self.ct_windows()]

    def describe(self, ct: bool) -> list[str]:
        """One line per network input channel, for the model card: what a reader of the card needs
        to know to feed the model, or to check that a pretrained encoder fits it. ``ct``: the
        model reads CT (Hounsfield windows), else images scaled by :data:`UNIT_MAPPING`."""
        windows = self.ct_windows()
        lines = []
        for offset in range(-self.neighbours, self.neighbours + 1):
            where = "this slice" if offset == 0 else f"slice {offset:+d}"
            for k in range(self.channels):
                what = (f"{windows[k].name} window {windows[k].centre:g}/{windows[k].width:g} HU" if ct
                        else f"{UNIT_MAPPING} (copy {k + 1} of {self.channels})")
                lines.append(f"{where}: {what}")
        return lines


def neighbour_picks(groups: Sequence[int], index: int, neighbours: int) -> list[int]:
    """Slice ``index`` and its ``neighbours`` on either side, in slice order, as indices into the
    slices; steps stop at the ends of the slice's own group (series or study), so an end slice is
    repeated rather than borrowed from the next study."""
    picks = []
    for offset in range(-neighbours, neighbours + 1):
        at, step = index, (1 if offset > 0 else -1)
        for _ in range(abs(offset)):
            if 0 <= at + step < len(groups) and groups[at + step] == groups[index]:
                at += step
        picks.append(at)
    return picks


def stack_neighbours(slices: torch.Tensor, neighbours: int, groups: Sequence[int] | None = None) -> torch.Tensor:
    """(N, C, S, S) per-slice inputs in slice order -> (N, C * (2n + 1), S, S): the 2.5D input of
    :class:`InputSpec` ``neighbours``, each slice with its neighbours (see :func:`neighbour_picks`)."""
    if neighbours == 0:
        return slices
    ids = list(groups) if groups is not None else [0] * slices.shape[0]
    if len(ids) != slices.shape[0]:
        raise ValueError(f"groups has {len(ids)} entries for {slices.shape[0]} slices")
    return torch.stack([slices[neighbour_picks(ids, i, neighbours)].flatten(0, 1) for i in range(len(ids))])


def image_input(source: Path | Dataset, frame: int, spec: InputSpec) -> torch.Tensor:
    """Network input of ``frame`` of ``source``: float32 (channels, size, size) in [0, 1].

    Goes through the stored encoding (uint16) on purpose: training images are stored that way, so
    inference must quantise identically or the two would differ in the last bits. Raises
    :class:`pretrain.decode.PixelDataError` for pixels that cannot be used (its ``reason`` says why).
    """
    stored, encoding = prepare_image(source, frame, spec.size)
    decoded = decode_hu(stored) if encoding == "hu" else decode_unit(stored)
    return eval_view(torch.from_numpy(decoded), encoding, spec.size, spec.channels, spec.window_pairs())


def letterbox_box(rows: int, columns: int, aspect: float, size: int) -> tuple[int, int, int, int]:
    """Where :func:`pretrain.decode.resize_square` puts a (rows, columns) image: (top, left, height, width).

    The same arithmetic as ``resize_square`` (a test checks the two agree): the longer physical side
    is scaled to ``size``, the other by the same factor, and the result is centred.
    """
    if rows < 1 or columns < 1 or size < 1:
        raise ValueError(f"rows, columns and size must be >= 1, got {rows}, {columns}, {size}")
    height, width = rows * max(aspect, 1e-6), float(columns)
    scale = size / max(height, width)
    new_rows = min(size, max(1, round(height * scale)))
    new_columns = min(size, max(1, round(width * scale)))
    return (size - new_rows) // 2, (size - new_columns) // 2, new_rows, new_columns


def _grid(source: Path | Dataset, frame: int) -> tuple[int, int, float]:
    """(rows, columns, aspect) of ``source``'s frame; a path is read header-only."""
    ds = source if isinstance(source, Dataset) else read_dataset(Path(source), header_only=True)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError("source has no usable Rows/Columns: cannot place a mask on its grid") from exc
    return rows, columns, pixel_aspect(ds, frame)


def mask_input(mask: np.ndarray, source: Path | Dataset, spec: InputSpec, *, frame: int = 0) -> torch.Tensor:
    """A binary mask on ``source``'s (rows, columns) grid, letterboxed like its image: uint8 (size, size).

    Resampled as floats by the image's own ``resize_square`` (bilinear, anti-aliased when
    shrinking) and thresholded at 0.5, so it lies exactly over the pixels :func:`image_input`
    returns. ``frame`` only matters for multi-frame objects whose pixel spacing is per frame.
    """
    rows, columns, aspect = _grid(source, frame)
    values = np.asarray(mask)
    if values.shape != (rows, columns):
        raise ValueError(
            f"mask shape {values.shape} does not match the source image's (rows, columns) {(rows, columns)}"
        )
    resized = resize_square(values.astype(np.float32), spec.size, fill=0.0, aspect=aspect)
    return torch.from_numpy((resized >= MASK_THRESHOLD).astype(np.uint8))


def mask_output(prob: torch.Tensor, source: Path | Dataset, spec: InputSpec, *, frame: int = 0) -> np.ndarray:
    """A (size, size) prediction back on ``source``'s grid: float32 (rows, columns), not thresholded.

    The inverse of the letterbox: the padding is cropped away and the image area resized to the
    source's rows and columns (bilinear, anti-aliased when shrinking, as ``resize_square`` does).
    Probabilities stay probabilities, so the caller picks the threshold (or writes a FRACTIONAL SEG).
    """
    if prob.dim() != 2 or tuple(prob.shape) != (spec.size, spec.size):
        raise ValueError(f"prob must be ({spec.size}, {spec.size}), got {tuple(prob.shape)}")
    rows, columns, aspect = _grid(source, frame)
    top, left, height, width = letterbox_box(rows, columns, aspect, spec.size)
    crop = prob.detach().to("cpu", torch.float32)[top : top + height, left : left + width]
    tensor = crop.reshape(1, 1, height, width)
    if (height, width) != (rows, columns):
        antialias = rows < height or columns < width
        tensor = F.interpolate(
            tensor, size=(rows, columns), mode="bilinear", align_corners=False, antialias=antialias
        )
    return np.ascontiguousarray(tensor[0, 0].numpy(), dtype=np.float32)
