"""Multi-crop views with medical augmentations, and the one deterministic input mapping for inference.

Three entry points:

* :class:`MultiCrop` makes the SwAV-style training views of one stored image: a few global crops
  and several small local ones, each with its own geometry and intensity augmentation.
* :func:`eval_view` is the deterministic preprocessing for finetuning validation and inference:
  the ONE place that turns a stored encoding (``hu`` or ``unit``, see :mod:`pretrain.shards`)
  into network input, so training and serving cannot drift apart.
* :func:`perturb` applies fixed, named perturbations (rotation, zoom, intensity scale, gamma) to
  a network input, for the robustness evaluation.

Determinism. Every random draw is taken from the ``torch.Generator`` the caller passes in, never
from the global RNG, and the number of draws does not depend on the image. A sample's views are
therefore a pure function of (image, config, generator seed): a loader that seeds one generator
per (epoch, sample index) reproduces every view after a restart, which is what makes resumed
training exact.

Geometry. A view's random resized crop, rotation, zoom and flips are composed into ONE affine
matrix and applied with a single affine grid + ``grid_sample`` (bilinear, zero padding,
align_corners=False) from the full-resolution source straight to the crop size; the grid is
``F.affine_grid``'s, built by :func:`_affine_grid` at a fraction of its CPU cost. Resampling once (rather than crop, then resize, then rotate)
avoids compounding interpolation blur, which would otherwise be a hidden, non-random
augmentation that eval inputs never get. All views of one :class:`CropSpec` are sampled in one
batched call.

Padding. ``grid_sample`` pads with zeros. For CT the source is shifted so that zero is air
(-1024 HU) before sampling and shifted back after, so a rotated or zoomed-out view is padded with
air, which every window then maps the same way it maps air inside the body outline; a literal
zero would be water (0 HU) and paint a mid-grey frame under soft-tissue windows. ``unit`` images
pad with 0, their black background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pretrain.shards import HU_OFFSET, Encoding

__all__ = [
    "DEFAULT_CT_WINDOWS",
    "NAMED_CT_WINDOWS",
    "AugmentConfig",
    "CropSpec",
    "Encoding",
    "MultiCrop",
    "eval_view",
    "perturb",
    "window",
]

# The CT display windows radiologists read with, by name: (centre, width) in HU.
NAMED_CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (600.0, 2800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),  # narrow grey/white matter contrast
}
# The order matters: a C-channel network gets the first C windows (stacked, like a radiologist
# flipping between presets), at training and at inference alike, so the first three form a
# general-purpose body set and the head-specific presets follow.
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = tuple(NAMED_CT_WINDOWS.values())

_AIR_HU = -float(HU_OFFSET)  # the lowest stored HU; what lies outside the patient


def _check_range(name: str, value: tuple[float, float], *, low: float, low_inclusive: bool) -> None:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} bounds must be finite, got {value}")
    if lo > hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    if (lo < low) if low_inclusive else (lo <= low):
        raise ValueError(f"{name} low bound must be {'>=' if low_inclusive else '>'} {low}, got {value}")


class CropSpec(BaseModel):
    """``count`` views of ``size`` x ``size`` pixels, each covering ``scale`` of the image area.

    ``scale`` is the fraction of the source image's area the crop covers before zoom jitter, as in
    torchvision's ``RandomResizedCrop`` (e.g. global ``(0.14, 1.0)``, local ``(0.05, 0.14)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=4, le=4096)
    count: int = Field(ge=1, le=1024)
    scale: tuple[float, float]

    @field_validator("scale")
    @classmethod
    def _scale_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        _check_range("scale", value, low=0.0, low_inclusive=False)
        if value[1] > 1.0:
            raise ValueError(f"scale is a fraction of the image area: need 0 < low <= high <= 1, got {value}")
        return value


class AugmentConfig(BaseModel):
    """Augmentation strengths; defaults are mild enough for medical images.

    Medical images carry meaning in absolute position and intensity (laterality, HU values), so
    the geometry stays close to the acquisition (small rotations, modest zoom, no vertical flip by
    default) and intensity changes are ones scanners and displays plausibly produce.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotation_deg: float = Field(default=15.0, ge=0.0, le=180.0)
    """Rotation drawn uniformly from +-rotation_deg, about the crop centre."""
    scale_jitter: tuple[float, float] = (0.9, 1.1)
    """Extra isotropic zoom drawn uniformly; > 1 magnifies (the crop covers less of the image)."""
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    """Crop width/height ratio, drawn log-uniformly."""
    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    vflip_p: float = Field(default=0.0, ge=0.0, le=1.0)
    ct_windows: list[tuple[float, float]] = Field(default_factory=lambda: list(DEFAULT_CT_WINDOWS))
    """CT (centre, width) presets in HU. One channel: one drawn per view. C channels: the first C."""
    window_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Relative jitter: centre moves by up to +-jitter * width, width scales by 1 +- jitter."""
    contrast: float = Field(default=0.2, ge=0.0, lt=1.0)
    """``unit`` images: contrast factor drawn from 1 +- contrast, about the view's mean."""
    brightness: float = Field(default=0.1, ge=0.0, le=1.0)
    """``unit`` images: additive offset drawn from +-brightness."""
    gamma: tuple[float, float] = (0.7, 1.5)
    """Gamma exponent, drawn log-uniformly (a gamma and its inverse are equally strong changes)."""
    gamma_p: float = Field(default=0.5, ge=0.0, le=1.0)
    noise_std: tuple[float, float] = (0.0, 0.05)
    """Standard deviation of additive gaussian noise, in [0, 1] intensity units."""
    noise_p: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    """Gaussian blur sigma in pixels at crop resolution."""
    blur_p: float = Field(default=0.5, ge=0.0, le=1.0)

    @field_validator("scale_jitter", "aspect", "gamma", "blur_sigma")
    @classmethod
    def _positive_range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        _check_range(info.field_name or "range", value, low=0.0, low_inclusive=False)
        return value

    @field_validator("noise_std")
    @classmethod
    def _non_negative_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        _check_range("noise_std", value, low=0.0, low_inclusive=True)
        return value

    @field_validator("ct_windows")
    @classmethod
    def _windows_valid(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if not value:
            raise ValueError("ct_windows needs at least one (centre, width) window")
        for centre, width in value:
            if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
                raise ValueError(
                    f"ct_windows entries must be finite (centre, width > 0), got {(centre, width)}"
                )
        return value


def window(hu: torch.Tensor, centre: float | torch.Tensor, width: float | torch.Tensor) -> torch.Tensor:
    """Map HU linearly so ``centre - width/2`` is 0 and ``centre + width/2`` is 1, clipped to [0, 1]."""
    return ((hu - (centre - width / 2)) / width).clamp_(0.0, 1.0)


def _as_source(image: torch.Tensor, encoding: str) -> torch.Tensor:
    """Validate a decoded image and return it as (1, 1, H, W) float32, shifted so 0 is the pad value."""
    if encoding not in ("hu", "unit"):
        raise ValueError(f"encoding must be 'hu' or 'unit', got {encoding!r}")
    if not image.is_floating_point():
        raise ValueError(
            f"image must be decoded floats (pretrain.shards.decode_hu / decode_unit), got dtype {image.dtype}"
        )
    if image.dim() == 3 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 2:
        raise ValueError(f"image must be (H, W) or (1, H, W), got shape {tuple(image.shape)}")
    source = image.to(torch.float32)
    if encoding == "hu":
        source = source - _AIR_HU  # zero padding then means air
    return source.reshape(1, 1, *source.shape)


def _theta(
    angle_rad: float, half_x: float, half_y: float, centre_x: float, centre_y: float, height: int, width: int
) -> list[list[float]]:
    """One ``affine_grid`` matrix from a map in centred pixel units.

    The output's normalised coordinates (x right, y down, in [-1, 1]) are scaled by
    ``(half_x, half_y)`` pixels (negative for a flip), rotated by ``angle_rad`` (positive turns
    the content counter-clockwise on screen) and moved to ``centre`` pixels from the image centre.
    Working in pixels keeps angles true on non-square sources; dividing by the half extents gives
    the normalised input coordinates ``grid_sample`` wants (align_corners=False: -1 and 1 are the
    outer pixel edges). Plain floats: per-view tensor arithmetic on a handful of numbers cost more
    than the resampling itself.
    """
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    half_w, half_h = width / 2.0, height / 2.0
    return [
        [cos * half_x / half_w, -sin * half_y / half_w, centre_x / half_w],
        [sin * half_x / half_h, cos * half_y / half_h, centre_y / half_h],
    ]


def _affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, *size), align_corners=False)``, computed as outer sums.

    The same grid (the tests compare it with ``F.affine_grid``) at a fraction of the cost on one
    CPU core, where the library's homogeneous base grid and batched matmul with an inner dimension
    of 3 took a third of the training loader's per-image budget.
    """
    count = theta.shape[0]
    rows, cols = size
    xs = (torch.arange(cols, dtype=torch.float32) * 2.0 + 1.0) / cols - 1.0
    ys = (torch.arange(rows, dtype=torch.float32) * 2.0 + 1.0) / rows - 1.0
    grid = torch.empty(count, rows, cols, 2, dtype=torch.float32)
    for axis in range(2):
        along_y = ys.view(1, rows, 1) * theta[:, axis, 1].view(count, 1, 1) + theta[:, axis, 2].view(
            count, 1, 1
        )
        torch.add(along_y, xs.view(1, 1, cols) * theta[:, axis, 0].view(count, 1, 1), out=grid[..., axis])
    return grid


def _resample(source: torch.Tensor, theta: list[list[list[float]]], size: tuple[int, int]) -> torch.Tensor:
    """One bilinear resampling of ``source`` (1 or N, C, H, W) through each of the N matrices."""
    matrices = torch.tensor(theta, dtype=torch.float32)
    count = matrices.shape[0]
    if source.shape[0] != count:
        source = source.expand(count, -1, -1, -1)
    grid = _affine_grid(matrices, size)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_taps(sigma: float, reach: int) -> list[float]:
    """Gaussian weights for offsets 0..reach, cut at ceil(3 sigma), normalised over both sides.

    Taps beyond the view's own radius weigh exactly 0, so a view blurred in a batch whose widest
    kernel is larger gets the same result as alone.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    taps = [
        math.exp(-0.5 * (offset / sigma) ** 2) if offset <= radius else 0.0 for offset in range(reach + 1)
    ]
    total = 2.0 * sum(taps) - taps[0]
    return [tap / total for tap in taps]


def _gaussian_blur(views: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable gaussian blur of (N, C, H, W), one sigma per view, border replicated.

    Shifted symmetric-pair sums weighted per view: on one CPU core several times faster than a
    grouped ``conv2d`` with one kernel per view, for kernels of at most a dozen taps.
    """
    reach = max(max(1, math.ceil(3.0 * sigma)) for sigma in sigmas)
    weights = torch.tensor([_gaussian_taps(sigma, reach) for sigma in sigmas], dtype=torch.float32)
    weights = weights.t().reshape(reach + 1, -1, 1, 1, 1)  # [offset] -> (N, 1, 1, 1)
    height, width = views.shape[-2:]
    padded = F.pad(views, (reach, reach, reach, reach), mode="replicate")
    rows = padded[..., reach : reach + height, :] * weights[0]
    for offset in range(1, reach + 1):
        pair = (
            padded[..., reach - offset : reach - offset + height, :]
            + padded[..., reach + offset : reach + offset + height, :]
        )
        rows.addcmul_(pair, weights[offset])
    out = rows[..., reach : reach + width] * weights[0]
    for offset in range(1, reach + 1):
        pair = (
            rows[..., reach - offset : reach - offset + width]
            + rows[..., reach + offset : reach + offset + width]
        )
        out.addcmul_(pair, weights[offset])
    return out


def _on_subset(
    views: torch.Tensor, chosen: list[int], operation: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace ``views[chosen]`` by ``operation(views[chosen])``: one batched call, no per-view loop."""
    if len(chosen) == views.shape[0]:
        views.copy_(operation(views))
    elif chosen:
        index = torch.tensor(chosen, dtype=torch.long)
        views.index_copy_(0, index, operation(views.index_select(0, index)))


def _uniform(u: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _log_uniform(u: float, bounds: tuple[float, float]) -> float:
    return math.exp(math.log(bounds[0]) + u * (math.log(bounds[1]) - math.log(bounds[0])))


# Columns of the per-view uniform draws, in a fixed order: the number of draws never depends on
# the image or on which augmentations fire, so one seed always yields the same stream.
_AREA, _RATIO, _CX, _CY, _ANGLE, _ZOOM, _HFLIP, _VFLIP = range(8)
_WINDOW, _CONTRAST, _BRIGHT, _GAMMA_P, _GAMMA, _BLUR_P, _BLUR, _NOISE_P, _NOISE = range(8, 17)
_FIXED_COLUMNS = 17  # followed by (centre, width) window-jitter columns, one pair per channel


class MultiCrop:
    """The multi-crop view generator: ``views(image, encoding, generator)``.

    Returns ``sum(spec.count)`` float32 tensors of shape (channels, size, size) in [0, 1], in the
    order of ``crops``. Per view: a random resized crop, rotation, zoom and flips (one affine
    resampling), then intensity: for CT a window drawn PER VIEW (jittered) and clipped to [0, 1];
    for ``unit`` images contrast and brightness jitter, replicated over channels. Then gamma,
    gaussian blur and gaussian noise, and a final clamp.

    Why the window is drawn per view: SwAV asks the network to assign two views of one image to
    the same prototype. When the two views were windowed differently (lung vs. soft tissue), the
    only way to agree is to encode anatomy rather than one fixed grey-level mapping, so the encoder
    becomes robust to intensity changes - one of the claims of the 100-million-image paper
    (Ghesu et al. 2022), which :func:`perturb` lets us check. With ``channels > 1`` the channels
    are the first ``channels`` windows stacked (each jittered), matching :func:`eval_view`.

    The instance holds only configuration, so it pickles into DataLoader workers.
    """

    def __init__(
        self, crops: Sequence[CropSpec], augment: AugmentConfig | None = None, channels: int = 1
    ) -> None:
        if not crops:
            raise ValueError("crops must list at least one CropSpec")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.crops: tuple[CropSpec, ...] = tuple(
            spec if isinstance(spec, CropSpec) else CropSpec.model_validate(spec) for spec in crops
        )
        self.augment = augment if augment is not None else AugmentConfig()
        if channels > 1 and channels > len(self.augment.ct_windows):
            raise ValueError(
                f"channels={channels} stacks the first {channels} ct_windows, "
                f"but only {len(self.augment.ct_windows)} are configured"
            )
        self.channels = channels

    @property
    def total_views(self) -> int:
        return sum(spec.count for spec in self.crops)

    def __call__(
        self, image: torch.Tensor, encoding: Encoding, generator: torch.Generator
    ) -> list[torch.Tensor]:
        return self.views(image, encoding, generator)

    def views(
        self, image: torch.Tensor, encoding: Encoding, generator: torch.Generator
    ) -> list[torch.Tensor]:
        """All views, one (channels, size, size) tensor each, in the order of ``crops``."""
        return [view for batch in self.batches(image, encoding, generator) for view in batch.unbind(0)]

    def batches(
        self, image: torch.Tensor, encoding: Encoding, generator: torch.Generator
    ) -> list[torch.Tensor]:
        """The same views stacked per crop spec: one (count, channels, size, size) tensor per spec.

        ``views`` is this, unbound; a collate function that stacks per spec can use it directly.
        """
        source = _as_source(image, encoding)
        height, width = source.shape[-2:]
        out = []
        for spec in self.crops:
            columns = _FIXED_COLUMNS + 2 * self.channels
            draws: list[list[float]] = torch.rand(
                spec.count, columns, generator=generator, dtype=torch.float64
            ).tolist()
            theta = [self._crop_theta(spec, row, height, width) for row in draws]
            views = _resample(source, theta, (spec.size, spec.size))
            out.append(self._intensity(views, encoding, draws, generator))
        return out

    def _crop_theta(self, spec: CropSpec, row: list[float], height: int, width: int) -> list[list[float]]:
        """Crop box, rotation, zoom and flips of one view, composed into one affine matrix.

        The box covers exactly ``area`` of the image (uniform in ``spec.scale``) and fits inside
        it. Its aspect ratio is log-uniform over ``aspect`` intersected with the ratios that fit,
        or the nearest ratio that fits when they do not intersect. That replaces torchvision's
        10-tries rejection loop: the same family of boxes, a fixed number of draws, and no silent
        whole-image fallback outside the requested scale. Rotation and zoom act about the box
        centre, so zoom > 1 shows less of the image and corners may reach the (air) padding.
        """
        aug = self.augment
        area = _uniform(row[_AREA], spec.scale)
        fit_lo, fit_hi = area * width / height, width / (area * height)
        ratio_lo = min(max(aug.aspect[0], fit_lo), fit_hi)
        ratio_hi = min(max(aug.aspect[1], fit_lo), fit_hi)
        ratio = _log_uniform(row[_RATIO], (ratio_lo, ratio_hi))
        box_w = min(math.sqrt(area * height * width * ratio), float(width))
        box_h = min(math.sqrt(area * height * width / ratio), float(height))
        zoom = _uniform(row[_ZOOM], aug.scale_jitter)
        flip_x = -1.0 if row[_HFLIP] < aug.hflip_p else 1.0
        flip_y = -1.0 if row[_VFLIP] < aug.vflip_p else 1.0
        return _theta(
            math.radians((2.0 * row[_ANGLE] - 1.0) * aug.rotation_deg),
            flip_x * box_w / (2.0 * zoom),
            flip_y * box_h / (2.0 * zoom),
            (row[_CX] - 0.5) * (width - box_w),
            (row[_CY] - 0.5) * (height - box_h),
            height,
            width,
        )

    def _windows(self, row: list[float]) -> list[tuple[float, float]]:
        """This view's (low HU, width) per channel: drawn preset(s), centre and width jittered.

        The centre moves by up to +-jitter * width (a relative move of the centre itself would
        leave windows centred near 0 HU fixed), the width scales by 1 +- jitter.
        """
        aug = self.augment
        if self.channels == 1:
            presets = [aug.ct_windows[min(int(row[_WINDOW] * len(aug.ct_windows)), len(aug.ct_windows) - 1)]]
        else:
            presets = aug.ct_windows[: self.channels]
        out = []
        for channel, (centre, width) in enumerate(presets):
            u_centre, u_width = row[_FIXED_COLUMNS + 2 * channel], row[_FIXED_COLUMNS + 2 * channel + 1]
            centre = centre + aug.window_jitter * width * (2.0 * u_centre - 1.0)
            width = width * (1.0 + aug.window_jitter * (2.0 * u_width - 1.0))
            out.append((centre - width / 2.0, width))
        return out

    def _intensity(
        self, views: torch.Tensor, encoding: str, draws: list[list[float]], generator: torch.Generator
    ) -> torch.Tensor:
        """(N, 1, S, S) resampled source -> (N, channels, S, S) augmented network input in [0, 1]."""
        aug = self.augment
        count = views.shape[0]
        if encoding == "hu":
            # window(x) = (x - low) / width with x = views + AIR: one subtract, one multiply.
            lows = [[low - _AIR_HU for low, _ in self._windows(row)] for row in draws]
            scales = [[1.0 / width for _, width in self._windows(row)] for row in draws]
            low_t = torch.tensor(lows, dtype=torch.float32).view(count, -1, 1, 1)
            scale_t = torch.tensor(scales, dtype=torch.float32).view(count, -1, 1, 1)
            out = (views - low_t).mul_(scale_t).clamp_(0.0, 1.0)
        else:
            # Contrast about the view's own mean, so it changes spread, not overall brightness.
            factor = [1.0 + aug.contrast * (2.0 * row[_CONTRAST] - 1.0) for row in draws]
            shift = [aug.brightness * (2.0 * row[_BRIGHT] - 1.0) for row in draws]
            factor_t = torch.tensor(factor, dtype=torch.float32).view(count, 1, 1, 1)
            shift_t = torch.tensor(shift, dtype=torch.float32).view(count, 1, 1, 1)
            offset = views.mean(dim=(1, 2, 3), keepdim=True).mul_(1.0 - factor_t).add_(shift_t)
            out = torch.addcmul(offset, views, factor_t).clamp_(0.0, 1.0)

        # Each augmentation runs once per crop spec on the views drawn for it, batched: at these
        # sizes per-call overhead, not arithmetic, dominates a per-view loop.
        chosen = [i for i, row in enumerate(draws) if row[_GAMMA_P] < aug.gamma_p]
        if chosen:
            gamma = torch.tensor([_log_uniform(draws[i][_GAMMA], aug.gamma) for i in chosen]).view(
                -1, 1, 1, 1
            )
            # x ** gamma as exp(gamma * log x), several times faster than pow here; the floor keeps
            # log off 0, whose -inf slow path costs more than the rest, and maps 0 to < 1e-9.
            _on_subset(out, chosen, lambda x: x.clamp_min(1e-12).log_().mul_(gamma).exp_())

        chosen = [i for i, row in enumerate(draws) if row[_BLUR_P] < aug.blur_p]
        if chosen:
            sigmas = [_uniform(draws[i][_BLUR], aug.blur_sigma) for i in chosen]
            _on_subset(out, chosen, lambda x: _gaussian_blur(x, sigmas))

        chosen = [i for i, row in enumerate(draws) if row[_NOISE_P] < aug.noise_p]
        if chosen:
            std = torch.tensor([_uniform(draws[i][_NOISE], aug.noise_std) for i in chosen]).view(-1, 1, 1, 1)
            # One noise field per view, shared by its channels: noise belongs to the acquisition,
            # which every window of the same slice sees.
            noise = torch.randn(len(chosen), 1, *out.shape[-2:], generator=generator, dtype=torch.float32)
            _on_subset(out, chosen, lambda x: x.add_(noise.mul_(std)))

        out.clamp_(0.0, 1.0)
        if out.shape[1] != self.channels:  # unit images: one intensity channel, replicated
            out = out.expand(-1, self.channels, -1, -1).contiguous()
        return out


def eval_view(
    image: torch.Tensor,
    encoding: Encoding,
    size: int,
    channels: int = 1,
    windows: Sequence[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Deterministic network input for finetuning validation and inference: (channels, size, size) in [0, 1].

    The whole (square) image is resized to ``size`` through the same affine resampling the
    training views use, so the network sees the same interpolation at train and test time. CT
    gets fixed windows, by default the first ``channels`` of :data:`DEFAULT_CT_WINDOWS` - the
    windows a ``channels``-channel :class:`MultiCrop` with default config stacks; ``unit`` images
    pass through (``windows`` is ignored for them) and are replicated over channels.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    chosen = list(DEFAULT_CT_WINDOWS[:channels] if windows is None else windows)
    if encoding == "hu":
        if len(chosen) != channels:
            raise ValueError(
                f"windows must give one (centre, width) per channel: {channels} channels, {len(chosen)} windows"
            )
        for centre, width in chosen:
            if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
                raise ValueError(f"windows entries must be finite (centre, width > 0), got {(centre, width)}")
    source = _as_source(image, encoding)
    height, width = source.shape[-2:]
    identity = _theta(0.0, width / 2.0, height / 2.0, 0.0, 0.0, height, width)
    resized = _resample(source, [identity], (size, size))[0]
    if encoding == "unit":
        return resized.clamp_(0.0, 1.0).expand(channels, -1, -1).contiguous()
    hu = resized + _AIR_HU
    return torch.cat([window(hu, centre, width) for centre, width in chosen], dim=0)


def perturb(
    image: torch.Tensor,
    *,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    intensity_scale: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """A fixed perturbation of network input (C, H, W) or (N, C, H, W) in [0, 1], for robustness tests.

    Rotation (degrees, counter-clockwise on screen) and zoom (``scale`` > 1 magnifies) act about
    the image centre in one resampling, through the same affine machinery as the training views;
    uncovered corners pad with 0. Then intensities are multiplied by ``intensity_scale``, clamped
    to [0, 1] and raised to ``gamma``. The defaults leave the image unchanged.
    """
    if not math.isfinite(rotation_deg):
        raise ValueError(f"rotation_deg must be finite, got {rotation_deg}")
    for name, value in (("scale", scale), ("gamma", gamma)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not (math.isfinite(intensity_scale) and intensity_scale >= 0):
        raise ValueError(f"intensity_scale must be finite and >= 0, got {intensity_scale}")
    if image.dim() not in (3, 4) or not image.is_floating_point():
        raise ValueError(
            f"image must be float (C, H, W) or (N, C, H, W), got {image.dtype} {tuple(image.shape)}"
        )
    batch = image.to(torch.float32)
    batch = batch if batch.dim() == 4 else batch[None]
    height, width = batch.shape[-2:]
    theta = _theta(
        math.radians(rotation_deg), width / (2.0 * scale), height / (2.0 * scale), 0.0, 0.0, height, width
    )
    out = _resample(batch, [theta] * batch.shape[0], (height, width))
    out = out.mul_(intensity_scale).clamp_(0.0, 1.0).pow_(gamma)
    return out if image.dim() == 4 else out[0]
