"""Multi-crop views, eval preprocessing and robustness perturbations (pretrain/augment.py).

Geometry is checked on images whose content says where a pixel came from (linear ramps), so a
crop box, zoom or rotation can be measured from the output instead of trusted.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pretrain.augment import (
    DEFAULT_CT_WINDOWS,
    AugmentConfig,
    CropSpec,
    MultiCrop,
    _affine_grid,
    _gaussian_blur,
    eval_view,
    perturb,
    window,
)

SIZE = 256
AIR = -1024.0

# Every augmentation off: geometry is the crop box alone and intensity the identity (or the window).
PLAIN = AugmentConfig(
    rotation_deg=0,
    scale_jitter=(1, 1),
    hflip_p=0,
    vflip_p=0,
    window_jitter=0,
    contrast=0,
    brightness=0,
    gamma_p=0,
    noise_p=0,
    blur_p=0,
)
WHOLE = CropSpec(size=128, count=2, scale=(1, 1))
SWAV = [CropSpec(size=224, count=2, scale=(0.14, 1.0)), CropSpec(size=96, count=6, scale=(0.05, 0.14))]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run as a DataLoader worker does: one intra-op thread (also immune to busy neighbours)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def ct_phantom(size: int = SIZE) -> torch.Tensor:
    """Air around a soft-tissue disc holding a lung ellipse and a bone ring: every window sees something."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    radius = torch.sqrt(x**2 + y**2)
    hu = torch.full((size, size), AIR)
    hu[radius < 0.42] = 40.0
    hu[((x + 0.12) / 0.18) ** 2 + (y / 0.25) ** 2 < 1] = -800.0
    hu[(radius > 0.36) & (radius < 0.40)] = 900.0
    hu += 20.0 * torch.sin(x * 40) * torch.cos(y * 33)
    return hu


def unit_phantom(size: int = SIZE) -> torch.Tensor:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return (0.5 + 0.3 * torch.sin(7 * x) * torch.cos(5 * y) + 0.1 * x).clamp(0, 1)


def ramp(axis: int, size: int = SIZE) -> torch.Tensor:
    """Pixel value = its centre coordinate along ``axis`` (0: y, 1: x) over the image size, in (0, 1)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return coords.view(-1, 1).expand(size, size).clone() if axis == 0 else coords.expand(size, size).clone()


def resized(image: torch.Tensor, size: int) -> torch.Tensor:
    """Reference resize: bilinear, align_corners=False, no antialiasing (what one grid_sample does)."""
    return F.interpolate(image[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]


# --- shapes, range, order -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["hu", "unit"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "augment",
    [
        AugmentConfig(),
        AugmentConfig(
            rotation_deg=180,
            scale_jitter=(0.5, 2.0),
            vflip_p=1,
            gamma_p=1,
            noise_p=1,
            noise_std=(0.2, 0.3),
            blur_p=1,
            blur_sigma=(2.0, 3.0),
            contrast=0.9,
            brightness=1.0,
            window_jitter=0.5,
        ),
        PLAIN,
    ],
    ids=["default", "strong", "plain"],
)
def test_views_have_spec_shapes_dtype_range_and_order(
    encoding: str, channels: int, augment: AugmentConfig
) -> None:
    image = ct_phantom() if encoding == "hu" else unit_phantom()
    multicrop = MultiCrop(SWAV, augment, channels=channels)
    views = multicrop.views(image, encoding, seeded(3))  # type: ignore[arg-type]
    assert multicrop.total_views == 8
    assert [tuple(v.shape) for v in views] == [(channels, 224, 224)] * 2 + [(channels, 96, 96)] * 6
    for view in views:
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()
        assert view.min() >= 0.0 and view.max() <= 1.0
    # Not degenerate: the views carry image content and differ from each other.
    assert any(float(v.std()) > 0.01 for v in views)
    assert not torch.equal(views[0], views[1])
    if encoding == "unit" and channels == 3:
        for view in views:
            assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])
    if encoding == "hu" and channels == 3:  # three different windows, so the channels differ
        assert not torch.equal(views[0][0], views[0][2])


def test_batches_stack_the_views_per_spec() -> None:
    multicrop = MultiCrop(SWAV, AugmentConfig())
    batches = multicrop.batches(ct_phantom(), "hu", seeded(11))
    views = multicrop.views(ct_phantom(), "hu", seeded(11))
    assert [tuple(b.shape) for b in batches] == [(2, 1, 224, 224), (6, 1, 96, 96)]
    assert torch.equal(torch.stack(views[:2]), batches[0])
    assert torch.equal(torch.stack(views[2:]), batches[1])


def test_accepts_a_leading_channel_axis() -> None:
    multicrop = MultiCrop(SWAV, AugmentConfig())
    flat = multicrop.views(unit_phantom(), "unit", seeded(2))
    chan = multicrop.views(unit_phantom()[None], "unit", seeded(2))
    assert all(torch.equal(a, b) for a, b in zip(flat, chan, strict=True))


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["hu", "unit"])
def test_views_are_a_function_of_the_generator_seed_only(encoding: str) -> None:
    image = ct_phantom() if encoding == "hu" else unit_phantom()
    multicrop = MultiCrop(SWAV, AugmentConfig(noise_p=1, blur_p=1, gamma_p=1), channels=3)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first = multicrop.views(image, encoding, seeded(1234))  # type: ignore[arg-type]
    # The global RNG is neither read nor advanced: a worker's other code cannot shift the views.
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(999)
    torch.rand(17)
    again = multicrop.views(image, encoding, seeded(1234))  # type: ignore[arg-type]
    other = multicrop.views(image, encoding, seeded(1235))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_multicrop_survives_pickling_into_a_worker() -> None:
    multicrop = MultiCrop(SWAV, AugmentConfig(), channels=3)
    clone = pickle.loads(pickle.dumps(multicrop))
    first = multicrop.views(ct_phantom(), "hu", seeded(6))
    again = clone.views(ct_phantom(), "hu", seeded(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_generator_advances_so_consecutive_calls_differ() -> None:
    multicrop = MultiCrop(SWAV, AugmentConfig())
    generator = seeded(5)
    first = multicrop.views(unit_phantom(), "unit", generator)
    second = multicrop.views(unit_phantom(), "unit", generator)
    assert not torch.equal(first[0], second[0])


# --- geometry ------------------------------------------------------------------------------------


def test_affine_grid_matches_torch() -> None:
    generator = seeded(0)
    theta = torch.randn(5, 2, 3, generator=generator)
    for size in [(7, 7), (96, 96), (31, 64)]:
        expected = F.affine_grid(theta, [5, 1, *size], align_corners=False)
        torch.testing.assert_close(_affine_grid(theta, size), expected, atol=1e-5, rtol=1e-5)


def test_whole_image_crop_without_augmentation_is_the_resized_image() -> None:
    image = unit_phantom()
    expected = resized(image, 128)
    views = MultiCrop([WHOLE], PLAIN).views(image, "unit", seeded(0))
    for view in views:
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_flips_mirror_the_view() -> None:
    image = unit_phantom()
    expected = resized(image, 128)
    hflip = MultiCrop([WHOLE], PLAIN.model_copy(update={"hflip_p": 1.0})).views(image, "unit", seeded(0))
    vflip = MultiCrop([WHOLE], PLAIN.model_copy(update={"vflip_p": 1.0})).views(image, "unit", seeded(0))
    torch.testing.assert_close(hflip[0], expected.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(vflip[0], expected.flip(-2), atol=1e-5, rtol=0)


def crop_extents(augment: AugmentConfig, spec: CropSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height, as fractions of the image, of each view's crop, measured on ramp images.

    A ramp's value is its coordinate and bilinear interpolation is exact on it, so the value
    difference between output columns 1 and S-2 is (S-3)/S of the box width. Columns 0 and S-1 are
    skipped: they can sit within half a pixel of the image edge, where zero padding bends the ramp.
    """
    multicrop = MultiCrop([spec], augment)
    across = torch.stack(multicrop.views(ramp(1), "unit", seeded(seed)))[:, 0]
    down = torch.stack(multicrop.views(ramp(0), "unit", seeded(seed)))[:, 0]
    inner = (spec.size - 3) / spec.size
    width = (across[:, :, -2] - across[:, :, 1]).mean(dim=1) / inner
    height = (down[:, -2, :] - down[:, 1, :]).mean(dim=1) / inner
    return width, height


@pytest.mark.parametrize("scale", [(0.05, 0.14), (0.14, 1.0), (0.3, 0.3)])
def test_crop_area_follows_the_scale_range(scale: tuple[float, float]) -> None:
    spec = CropSpec(size=48, count=200, scale=scale)
    width, height = crop_extents(PLAIN.model_copy(update={"aspect": (3 / 4, 4 / 3)}), spec, seed=7)
    area = width * height
    lo, hi = scale
    span = hi - lo
    assert float(area.min()) >= lo - 1e-3 and float(area.max()) <= hi + 1e-3
    # Uniform over the range: both ends reached and the mean in the middle.
    assert float(area.min()) <= lo + 0.1 * span + 1e-3
    assert float(area.max()) >= hi - 0.1 * span - 1e-3
    assert abs(float(area.mean()) - (lo + hi) / 2) <= 0.08 * span + 1e-3
    ratio = width / height
    assert float(ratio.min()) >= 3 / 4 - 1e-3 and float(ratio.max()) <= 4 / 3 + 1e-3
    if span > 0:
        assert float(ratio.min()) < 0.85 and float(ratio.max()) > 1.2
    assert float(width.max()) <= 1 + 1e-3 and float(height.max()) <= 1 + 1e-3  # the box fits


def test_zoom_jitter_shrinks_the_covered_area() -> None:
    spec = CropSpec(size=48, count=50, scale=(0.4, 0.4))
    width, height = crop_extents(PLAIN.model_copy(update={"scale_jitter": (2.0, 2.0)}), spec, seed=3)
    torch.testing.assert_close(width * height, torch.full((50,), 0.1), atol=1e-3, rtol=0)


def test_rotation_angles_stay_within_the_configured_range() -> None:
    limit = 30.0
    spec = CropSpec(size=32, count=100, scale=(0.3, 0.3))
    augment = PLAIN.model_copy(update={"rotation_deg": limit, "aspect": (1.0, 1.0)})
    views = torch.stack(MultiCrop([spec], augment).views(ramp(1), "unit", seeded(9)))[:, 0]
    centre = views[:, 8:24, 8:24]  # well inside the image whatever the angle
    d_across = (centre[:, :, 1:] - centre[:, :, :-1]).mean(dim=(1, 2))
    d_down = (centre[:, 1:, :] - centre[:, :-1, :]).mean(dim=(1, 2))
    angles = torch.rad2deg(torch.atan2(-d_down, d_across))
    assert float(angles.abs().max()) <= limit + 0.5
    assert float(angles.min()) < -0.8 * limit and float(angles.max()) > 0.8 * limit


def test_rotated_and_zoomed_out_ct_is_padded_with_air() -> None:
    water = torch.zeros(64, 64)
    lung = (-600.0, 1500.0)
    augment = PLAIN.model_copy(update={"ct_windows": [lung], "scale_jitter": (0.5, 0.5)})
    view = MultiCrop([CropSpec(size=64, count=1, scale=(1, 1))], augment).views(water, "hu", seeded(0))[0][0]
    air_value = (AIR - (lung[0] - lung[1] / 2)) / lung[1]
    water_value = (0.0 - (lung[0] - lung[1] / 2)) / lung[1]
    assert view[0, 0].item() == pytest.approx(air_value, abs=1e-5)
    assert view[32, 32].item() == pytest.approx(water_value, abs=1e-5)


# --- intensity -----------------------------------------------------------------------------------


def window_test_image() -> torch.Tensor:
    """4x4 blocks of HU: soft-tissue window (40, 400) low, high, centre, far below, far above."""
    values = torch.tensor([[-160.0, 240.0], [40.0, -1000.0]])
    image = values.repeat_interleave(8, 0).repeat_interleave(8, 1)
    image[:4, :4] = 3000.0
    return image


def test_ct_window_maps_its_bounds_to_zero_and_one() -> None:
    image = window_test_image()
    soft = (40.0, 400.0)
    for view in (
        eval_view(image, "hu", 16, windows=[soft])[0],
        MultiCrop(
            [CropSpec(size=16, count=1, scale=(1, 1))], PLAIN.model_copy(update={"ct_windows": [soft]})
        ).views(image, "hu", seeded(0))[0][0],
    ):
        assert view[4, 4].item() == pytest.approx(0.0, abs=1e-6)  # -160 HU = centre - width / 2
        assert view[4, 12].item() == pytest.approx(1.0, abs=1e-6)  # 240 HU = centre + width / 2
        assert view[12, 4].item() == pytest.approx(0.5, abs=1e-6)  # the centre
        assert view[12, 12].item() == 0.0 and view[0, 0].item() == 1.0  # clipped
    assert window(torch.tensor([-160.0, 40.0, 240.0]), 40.0, 400.0).tolist() == pytest.approx([0, 0.5, 1])


def test_window_jitter_moves_the_window_within_bounds() -> None:
    # (40, 400) with 10% jitter: centre in [0, 80], width in [360, 440], so low in [-220, -100] and
    # high in [180, 300]; 0 and 100 HU stay inside every jittered window.
    image = torch.tensor([[-221.0, 0.0], [301.0, 100.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    augment = PLAIN.model_copy(update={"ct_windows": [(40.0, 400.0)], "window_jitter": 0.1})
    multicrop = MultiCrop([CropSpec(size=8, count=60, scale=(1, 1))], augment)
    views = torch.stack(multicrop.views(image, "hu", seeded(4)))[:, 0].double()
    assert (views[:, 1, 1] == 0).all() and (views[:, 5, 1] == 1).all()
    at_0, at_100 = views[:, 1, 5], views[:, 5, 5]
    width = 100.0 / (at_100 - at_0)
    centre = -at_0 * width + width / 2
    assert float(width.min()) >= 360 - 0.5 and float(width.max()) <= 440 + 0.5
    assert float(centre.min()) >= 0 - 0.5 and float(centre.max()) <= 80 + 0.5
    assert float(width.max() - width.min()) > 50 and float(centre.max() - centre.min()) > 50


def test_one_channel_ct_draws_its_window_from_the_presets_per_view() -> None:
    image = torch.full((8, 8), 40.0)  # the centre of every preset but lung and bone
    presets = [(40.0, 400.0), (-600.0, 1500.0)]
    augment = PLAIN.model_copy(update={"ct_windows": presets})
    views = MultiCrop([CropSpec(size=8, count=60, scale=(1, 1))], augment).views(image, "hu", seeded(8))
    seen = {round(view[0, 4, 4].item(), 4) for view in views}
    assert seen == {0.5, round((40 + 1350) / 1500, 4)}


def test_stacked_ct_channels_are_the_first_windows_and_match_eval() -> None:
    image = ct_phantom(32)
    views = MultiCrop([CropSpec(size=32, count=2, scale=(1, 1))], PLAIN, channels=3).views(
        image, "hu", seeded(0)
    )
    expected = torch.stack([window(image, c, w) for c, w in DEFAULT_CT_WINDOWS[:3]])
    for view in views:
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(eval_view(image, "hu", 32, channels=3), expected, atol=1e-5, rtol=0)


def test_gamma_noise_and_blur_do_what_they_say() -> None:
    image = unit_phantom()
    base = resized(image, 128)
    only = PLAIN.model_copy(update={"gamma_p": 1.0, "gamma": (2.0, 2.0)})
    gamma_view = MultiCrop([WHOLE], only).views(image, "unit", seeded(0))[0]
    torch.testing.assert_close(gamma_view, base**2, atol=1e-5, rtol=0)

    grey = torch.full((64, 64), 0.5)
    noisy = MultiCrop(
        [CropSpec(size=64, count=1, scale=(1, 1))],
        PLAIN.model_copy(update={"noise_p": 1.0, "noise_std": (0.05, 0.05)}),
    ).views(grey, "unit", seeded(0))[0]
    assert float(noisy.std()) == pytest.approx(0.05, rel=0.1)
    assert float(noisy.mean()) == pytest.approx(0.5, abs=0.01)

    blurred = MultiCrop([WHOLE], PLAIN.model_copy(update={"blur_p": 1.0, "blur_sigma": (1.0, 1.0)})).views(
        image, "unit", seeded(0)
    )[0]
    torch.testing.assert_close(blurred, _gaussian_blur(base[None], [1.0])[0], atol=1e-6, rtol=0)
    assert float((blurred - base).abs().max()) > 1e-3


def test_unit_brightness_shifts_and_contrast_scales_about_the_mean() -> None:
    grey = torch.full((16, 16), 0.5)
    augment = PLAIN.model_copy(update={"brightness": 0.1})
    views = MultiCrop([CropSpec(size=16, count=50, scale=(1, 1))], augment).views(grey, "unit", seeded(1))
    centre = torch.stack([view[0, 8, 8] for view in views])
    assert float(centre.min()) >= 0.4 - 1e-6 and float(centre.max()) <= 0.6 + 1e-6
    assert float(centre.max() - centre.min()) > 0.1

    halves = torch.cat([torch.full((16, 8), 0.3), torch.full((16, 8), 0.7)], dim=1)
    augment = PLAIN.model_copy(update={"contrast": 0.5})
    views = MultiCrop([CropSpec(size=16, count=50, scale=(1, 1))], augment).views(halves, "unit", seeded(2))
    spread = torch.stack([view[0, 8, 12] - view[0, 8, 3] for view in views])
    means = torch.stack([view.mean() for view in views])
    torch.testing.assert_close(means, torch.full((50,), 0.5), atol=1e-5, rtol=0)  # the mean is kept
    assert float(spread.min()) >= 0.4 * 0.5 - 1e-5 and float(spread.max()) <= 0.4 * 1.5 + 1e-5
    assert float(spread.max() - spread.min()) > 0.2


def test_blur_matches_a_convolution_and_ignores_its_batch() -> None:
    image = torch.rand(2, 1, 40, 40, generator=seeded(0))
    sigmas = [0.6, 1.5]
    batched = _gaussian_blur(image, sigmas)
    for index, sigma in enumerate(sigmas):
        radius = math.ceil(3 * sigma)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        kernel = (taps / taps.sum()).to(torch.float32)
        padded = F.pad(image[index : index + 1], (radius,) * 4, mode="replicate")
        expected = F.conv2d(F.conv2d(padded, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))[0]
        torch.testing.assert_close(batched[index], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(_gaussian_blur(image[index : index + 1], [sigma])[0], batched[index])
    assert torch.allclose(_gaussian_blur(torch.full((1, 1, 9, 9), 0.3), [1.2]), torch.tensor(0.3))


# --- eval_view -----------------------------------------------------------------------------------


def test_eval_view_is_deterministic_and_resizes_the_whole_image() -> None:
    image = unit_phantom()
    first = eval_view(image, "unit", 128, channels=3)
    assert torch.equal(first, eval_view(image, "unit", 128, channels=3))
    assert first.shape == (3, 128, 128) and first.dtype == torch.float32
    torch.testing.assert_close(first, resized(image, 128).expand(3, -1, -1), atol=1e-5, rtol=0)
    hu = ct_phantom()
    ct = eval_view(hu, "hu", 224)
    assert torch.equal(ct, eval_view(hu, "hu", 224))
    assert ct.shape == (1, 224, 224) and 0 <= float(ct.min()) and float(ct.max()) <= 1
    expected = window(resized(hu, 224), *DEFAULT_CT_WINDOWS[0])
    # Sample positions agree to ~1e-5 pixel; across a 1900 HU bone/air edge that is ~0.03 HU.
    torch.testing.assert_close(ct, expected, atol=2e-4, rtol=0)


def test_eval_view_rejects_windows_that_do_not_match_channels() -> None:
    with pytest.raises(ValueError, match="windows"):
        eval_view(ct_phantom(), "hu", 64, channels=2, windows=[(40.0, 400.0)])
    with pytest.raises(ValueError, match="windows"):
        eval_view(ct_phantom(), "hu", 64, windows=[(40.0, 0.0)])


# --- perturb -------------------------------------------------------------------------------------


def test_perturb_defaults_are_the_identity() -> None:
    image = torch.rand(3, 32, 48, generator=seeded(0))
    torch.testing.assert_close(perturb(image), image, atol=1e-6, rtol=0)
    batch = torch.rand(2, 3, 32, 32, generator=seeded(1))
    torch.testing.assert_close(perturb(batch, rotation_deg=0, scale=1, intensity_scale=1, gamma=1), batch)


def test_perturb_rotation_by_90_degrees_is_rot90() -> None:
    image = torch.rand(2, 33, 33, generator=seeded(0))
    torch.testing.assert_close(
        perturb(image, rotation_deg=90), torch.rot90(image, 1, (-2, -1)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        perturb(image, rotation_deg=-90), torch.rot90(image, -1, (-2, -1)), atol=1e-5, rtol=0
    )


def test_perturb_zoom_and_intensity() -> None:
    image = ramp(1, 64)[None]
    zoomed = perturb(image, scale=2.0)[0]
    # Magnifying 2x about the centre halves the ramp's change per pixel and keeps the centre in place.
    slope = (zoomed[:, 40] - zoomed[:, 24]).mean() / 16
    assert float(slope) == pytest.approx(1 / 128, rel=1e-4)
    assert float(zoomed[:, 31:33].mean()) == pytest.approx(0.5, abs=1e-5)
    torch.testing.assert_close(perturb(image, intensity_scale=0.5), image * 0.5)
    torch.testing.assert_close(perturb(image, intensity_scale=3.0), (image * 3).clamp(0, 1))
    torch.testing.assert_close(perturb(image, gamma=2.0), image**2)


def test_perturb_rejects_bad_arguments() -> None:
    image = torch.rand(1, 8, 8)
    for kwargs, name in [
        ({"scale": 0.0}, "scale"),
        ({"gamma": -1.0}, "gamma"),
        ({"intensity_scale": -0.5}, "intensity_scale"),
        ({"rotation_deg": math.nan}, "rotation_deg"),
    ]:
        with pytest.raises(ValueError, match=name):
            perturb(image, **kwargs)
    with pytest.raises(ValueError, match="image"):
        perturb(torch.rand(8, 8))


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kwargs", "field"),
    [
        (CropSpec, {"size": 96, "count": 2, "scale": (0.5, 0.2)}, "scale"),
        (CropSpec, {"size": 96, "count": 2, "scale": (0.0, 0.2)}, "scale"),
        (CropSpec, {"size": 96, "count": 2, "scale": (0.5, 1.2)}, "scale"),
        (CropSpec, {"size": 0, "count": 2, "scale": (0.5, 1.0)}, "size"),
        (CropSpec, {"size": 96, "count": 0, "scale": (0.5, 1.0)}, "count"),
        (CropSpec, {"size": 96, "count": 1, "scale": (0.5, 1.0), "sizes": 3}, "sizes"),
        (AugmentConfig, {"hflip_p": 1.5}, "hflip_p"),
        (AugmentConfig, {"rotation_deg": -1}, "rotation_deg"),
        (AugmentConfig, {"gamma": (0.0, 1.0)}, "gamma"),
        (AugmentConfig, {"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
        (AugmentConfig, {"aspect": (-1.0, 1.0)}, "aspect"),
        (AugmentConfig, {"scale_jitter": (1.2, 0.8)}, "scale_jitter"),
        (AugmentConfig, {"noise_std": (-0.1, 0.1)}, "noise_std"),
        (AugmentConfig, {"ct_windows": [(40.0, 0.0)]}, "ct_windows"),
        (AugmentConfig, {"ct_windows": []}, "ct_windows"),
        (AugmentConfig, {"window_jitter": 1.0}, "window_jitter"),
        (AugmentConfig, {"contrast": -0.1}, "contrast"),
        (AugmentConfig, {"rotaton_deg": 10}, "rotaton_deg"),
    ],
)
def test_invalid_config_names_the_field(model: type, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        model(**kwargs)
    assert [error["loc"][0] for error in raised.value.errors()] == [field]


def test_multicrop_rejects_bad_setup_and_input() -> None:
    with pytest.raises(ValueError, match="crops"):
        MultiCrop([], AugmentConfig())
    with pytest.raises(ValueError, match="channels"):
        MultiCrop(SWAV, AugmentConfig(), channels=len(DEFAULT_CT_WINDOWS) + 1)
    with pytest.raises(ValueError, match="channels"):
        MultiCrop(SWAV, AugmentConfig(), channels=0)
    multicrop = MultiCrop(SWAV, AugmentConfig())
    with pytest.raises(ValueError, match="decode"):
        multicrop.views(torch.zeros(64, 64, dtype=torch.int32), "hu", seeded(0))
    with pytest.raises(ValueError, match="encoding"):
        multicrop.views(torch.zeros(64, 64), "png", seeded(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        multicrop.views(torch.zeros(3, 64, 64), "unit", seeded(0))
