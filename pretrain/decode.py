"""DICOM pixels to what the network sees: the one place that decodes, rescales, normalises, resizes.

Training (``prepare``) and, later, the inference workers import this module, so a model sees the
same pixels in both: every function takes a path or an already-read pydicom ``Dataset``.

Decoding goes through pydicom 3's public API; the compressed transfer syntaxes need plugins, chosen
for their licences (pyproject.toml lists them): python-gdcm (BSD) for the JPEG family (baseline,
extended, lossless incl. SV1, JPEG-LS) and as a fallback everywhere, pylibjpeg-openjpeg (BSD-2)
for JPEG 2000, pylibjpeg-rle (MIT) or pydicom itself for RLE, pyjpegls (CharLS, BSD-3) for
JPEG-LS. pylibjpeg-libjpeg (GPLv3) is deliberately not used. pydicom tries every available plugin
in turn (gdcm first for the JPEG family), so one that fails on a file does not stop the others.

What comes out:

* ``hu`` (CT): Hounsfield units after the modality LUT (rescale, per frame for enhanced CT);
  the window is sampled per view at training time, so nothing is windowed here.
* ``unit`` (everything else): robust percentile scaling to ``[0, 1]``; MR over the foreground,
  radiography over the image with MONOCHROME1 inverted, ultrasound and the rest over the image.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGExtended12Bit

from pretrain.shards import HU_OFFSET, Encoding, encode_hu, encode_unit

# Storage classes whose grey values are Hounsfield units after the modality LUT. A secondary
# capture labelled CT (a dose report screenshot, a 3D rendering) is not: it is scaled like a photo.
CT_STORAGE_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Above this size a file is not read whole to decode one frame: pydicom reads just that frame.
LARGE_FILE_BYTES = 256 * 1024 * 1024
# Percentiles of the robust scaling, and the most pixels they are estimated from (a strided subsample).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
PERCENTILE_SAMPLES = 1 << 18

# What pydicom, its plugins and a hostile file can raise while parsing or decoding. Named, not
# ``Exception``: a programming error in this module must still surface as one.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    ValueError,  # short pixel data, bad values (UnicodeDecodeError is one too)
    TypeError,
    AttributeError,  # a required Image Pixel element missing
    LookupError,  # KeyError, IndexError: frame or fragment not there
    RuntimeError,  # "all plugins failed"; NotImplementedError, RecursionError are subclasses
    ArithmeticError,
    EOFError,
    OSError,
    struct.error,
    zlib.error,
)


class PixelDataError(ValueError):
    """An image that cannot be turned into network input; ``reason`` is short and machine-readable.

    Reasons: ``missing-file``, ``unreadable``, ``no-pixel-data``, ``bad-frame``, ``undecodable``,
    ``unsupported-photometric``, ``blank``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Frame:
    """One decoded frame and the header facts its normalisation needs."""

    pixels: np.ndarray  # float32, (rows, columns), modality LUT applied, colour as luminance
    modality: str
    photometric: str
    aspect: float  # physical height / width of one pixel (row spacing / column spacing)
    hounsfield: bool  # grey CT whose values are HU (see CT_STORAGE_CLASSES)


def read_dataset(path: Path, *, header_only: bool = False) -> Dataset:
    """Read a Part 10 file, mapping every parse failure to ``PixelDataError``."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except FileNotFoundError as exc:
        raise PixelDataError("missing-file") from exc
    except DECODE_ERRORS as exc:
        raise PixelDataError("unreadable", type(exc).__name__) from exc


def has_pixel_data(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS)


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent or unusable (a few writers put 0 or garbage there)."""
    try:
        value = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(value, 1)


def functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The first item of a functional group macro for ``frame``: per-frame wins over shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if not items or index >= len(items):
            continue
        macro = items[index].get(sequence)
        if macro:
            item: Dataset = macro[0]
            return item
    return None


def _modality_lut(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """Rescale (or Modality LUT) from the top level, or from the functional groups of ``frame``."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds))
    transform = functional_item(ds, frame, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform and "RescaleIntercept" in transform:
        return arr.astype(np.float64) * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    return arr


def pixel_aspect(ds: Dataset, frame: int = 0) -> float:
    """Row spacing over column spacing (1.0 when unknown): anisotropic pixels must not distort."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        measures = functional_item(ds, frame, "PixelMeasuresSequence")
        spacing = measures.get("PixelSpacing") if measures is not None else None
    try:
        row, column = (float(value) for value in list(spacing)[:2]) if spacing else (1.0, 1.0)
    except (TypeError, ValueError):
        return 1.0
    if row <= 0 or column <= 0 or not np.isfinite(row / column):
        return 1.0
    return row / column


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma: what a grey-scale network should see of a colour image."""
    rgb = rgb.astype(np.float32)
    return np.asarray(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], dtype=np.float32)


def _jpeg12_gdcm(ds: Dataset, frame: int) -> np.ndarray:
    """12-bit JPEG Extended (process 4) through GDCM directly.

    GDCM decodes it (it carries 8, 12 and 16-bit libjpeg builds), but pydicom 3's gdcm plugin
    refuses 12-bit precision and its other JPEG plugins are GPL (pylibjpeg-libjpeg) or 8-bit
    only (Pillow). Lossy 12-bit CT is common in older archives. libjpeg prints "Unsupported JPEG
    data precision 12" on stderr before GDCM retries with its 12-bit build: harmless.
    """
    import gdcm  # BSD; imported here so a header-only user of this module does not load it

    src = get_frame(ds.PixelData, frame, number_of_frames=number_of_frames(ds))
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    rows, columns = int(ds.Rows), int(ds.Columns)
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))))
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, signed))
    buffer = image.GetBuffer()
    if not buffer:
        raise RuntimeError("GDCM returned no pixels for 12-bit JPEG")
    decoded = np.frombuffer(buffer.encode("utf-8", "surrogateescape"), dtype="<i2" if signed else "<u2")
    if decoded.size != rows * columns:
        raise ValueError(f"12-bit JPEG decoded to {decoded.size} values, expected {rows * columns}")
    return decoded.reshape(rows, columns)


def _palette_little_endian(ds: Dataset) -> Dataset:
    """The palette of a big-endian dataset with its 16-bit LUT data in little-endian order.

    pydicom 3.0's ``apply_color_lut`` reads (non-segmented) palette data in the machine's byte
    order, so a big-endian file comes out byte-swapped; hand it a corrected copy instead.
    """
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    little = transfer_syntax.is_little_endian if transfer_syntax else ds.original_encoding[1] is not False
    if little:
        return ds
    fixed = Dataset()
    fixed.file_meta = FileMetaDataset()
    fixed.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for colour in ("Red", "Green", "Blue", "Alpha"):
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        if descriptor is None or data is None:
            continue
        setattr(fixed, f"{colour}PaletteColorLookupTableDescriptor", descriptor)
        entries = int(descriptor[0]) or 65536
        raw = bytes(data)
        if len(raw) == 2 * entries:
            raw = np.frombuffer(raw, dtype=">u2").astype("<u2").tobytes()
        setattr(fixed, f"{colour}PaletteColorLookupTableData", raw)
    if "RedPaletteColorLookupTableData" not in fixed:
        return ds  # segmented palettes: pydicom honours the byte order there
    return fixed


def _decode(source: Path | Dataset, ds: Dataset, frame: int) -> np.ndarray:
    try:
        file_meta = getattr(ds, "file_meta", None)
        transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        if (
            transfer_syntax == JPEGExtended12Bit
            and int(ds.get("BitsStored", 8)) > 8
            and int(ds.get("SamplesPerPixel", 1)) == 1
        ):
            return _jpeg12_gdcm(source if isinstance(source, Dataset) else read_dataset(source), frame)
        return np.asarray(pixel_array(source, index=frame))
    except FileNotFoundError as exc:
        raise PixelDataError("missing-file") from exc
    except DECODE_ERRORS as exc:
        raise PixelDataError("undecodable", f"{type(exc).__name__}: {exc}"[:300]) from exc


def _open(source: Path | Dataset) -> tuple[Path | Dataset, Dataset]:
    """What to decode from, and the header: a large file is decoded frame by frame from disk."""
    if isinstance(source, Dataset):
        return source, source
    path = Path(source)
    try:
        large = path.stat().st_size > LARGE_FILE_BYTES
    except FileNotFoundError as exc:
        raise PixelDataError("missing-file") from exc
    if large:
        header = read_dataset(path, header_only=True)
        # pydicom reads a frame straight from the file, except through a deflated dataset.
        if header.file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return path, header
    ds = read_dataset(path)
    return ds, ds


def load_frame_info(source: Path | Dataset, frame: int = 0) -> Frame:
    """Decode ``frame`` of ``source`` with the modality LUT applied and colour reduced to luminance."""
    decode_from, ds = _open(source)
    if isinstance(decode_from, Dataset) and not has_pixel_data(ds):
        raise PixelDataError("no-pixel-data")
    frames = number_of_frames(ds)
    if not 0 <= frame < frames:
        raise PixelDataError("bad-frame", f"frame {frame} of {frames}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    arr = _decode(decode_from, ds, frame)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if photometric == "PALETTE COLOR":
        try:
            arr = _luminance(np.asarray(apply_color_lut(arr, _palette_little_endian(ds))))
        except DECODE_ERRORS as exc:
            raise PixelDataError("undecodable", f"palette: {type(exc).__name__}") from exc
    elif arr.ndim == 3 and arr.shape[-1] == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        # pydicom hands YBR_FULL(_422) over as RGB; JPEG 2000's YBR_RCT/ICT come out of the codec as RGB.
        arr = _luminance(arr)
    elif arr.ndim != 2 or not photometric.startswith("MONOCHROME"):
        raise PixelDataError("unsupported-photometric", f"{photometric} {arr.shape}")
    else:
        try:
            arr = _modality_lut(arr, ds, frame)
        except DECODE_ERRORS as exc:
            raise PixelDataError("undecodable", f"modality LUT: {type(exc).__name__}") from exc
    pixels = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(pixels).all():
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    modality = str(ds.get("Modality", "")).strip().upper()
    return Frame(
        pixels=pixels,
        modality=modality,
        photometric=photometric,
        aspect=pixel_aspect(ds, frame),
        hounsfield=modality == "CT"
        and photometric.startswith("MONOCHROME")
        and str(ds.get("SOPClassUID", "")) in CT_STORAGE_CLASSES,
    )


def load_frame(source: Path | Dataset, frame: int = 0) -> np.ndarray:
    """``frame`` of ``source`` as float32 (rows, columns): modality LUT applied, colour as luminance.

    Raises ``PixelDataError`` (with a ``reason``) for anything that does not decode.
    """
    return load_frame_info(source, frame).pixels


def _sample(pixels: np.ndarray) -> np.ndarray:
    """A strided subsample for percentile estimation: same answer to a fraction, far less time."""
    step = max(1, int(np.sqrt(pixels.size / PERCENTILE_SAMPLES)))
    return pixels[::step, ::step].ravel() if pixels.ndim == 2 else pixels.ravel()[::step * step]


def _percentile_scale(pixels: np.ndarray, sample: np.ndarray) -> np.ndarray:
    if sample.size == 0:
        sample = pixels.ravel()
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        # Mostly one value (a thin structure on a flat background): fall back to the full range.
        low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros_like(pixels, dtype=np.float32)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)


def normalise(
    pixels: np.ndarray, modality: str, photometric: str, *, hounsfield: bool = True
) -> tuple[np.ndarray, Encoding]:
    """Per-modality intensity normalisation; returns float32 values and their encoding.

    CT: unchanged Hounsfield units (``hu``), unless ``hounsfield`` is false (a secondary capture
    labelled CT: its values are not HU, so it is scaled like the rest). MR: 0.5/99.5 percentiles of the foreground (above
    the image minimum, i.e. without the zero-filled background that would otherwise pin the low
    percentile) to ``[0, 1]``. Everything else (radiography: CR, DX, MG, RF, XA, PX, IO; ultrasound;
    secondary captures): 0.5/99.5 percentiles of the whole image to ``[0, 1]``. MONOCHROME1 is
    inverted afterwards, so that high values are bright (dense) everywhere.
    """
    modality = modality.strip().upper()
    pixels = np.asarray(pixels, dtype=np.float32)
    if modality == "CT" and hounsfield:
        return pixels, "hu"
    sample = _sample(pixels)
    if modality == "MR":
        sample = sample[sample > sample.min()] if sample.size else sample
    scaled = _percentile_scale(pixels, sample)
    if photometric.strip().upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled, "unit"


def resize_square(image: np.ndarray, size: int, fill: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    """Letterbox ``image`` into ``size`` x ``size``: keep the aspect ratio, pad with ``fill``.

    The longer side is scaled to ``size`` (bilinear with anti-aliasing, so downsampling a 2k
    radiograph does not alias); ``aspect`` (row over column pixel spacing) corrects non-square
    pixels. Returns float32.
    """
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    rows, columns = image.shape
    height, width = rows * max(aspect, 1e-6), float(columns)
    scale = size / max(height, width)
    new_rows = min(size, max(1, round(height * scale)))
    new_columns = min(size, max(1, round(width * scale)))
    import torch  # only resizing needs it: the index reads headers with this module and no torch

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if (new_rows, new_columns) != (rows, columns):
        antialias = new_rows < rows or new_columns < columns
        tensor = torch.nn.functional.interpolate(
            tensor, size=(new_rows, new_columns), mode="bilinear", align_corners=False, antialias=antialias
        )
    out = np.full((size, size), fill, dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_columns) // 2
    out[top : top + new_rows, left : left + new_columns] = tensor[0, 0].numpy()
    return out


def prepare_image(source: Path | Dataset, frame: int, size: int) -> tuple[np.ndarray, Encoding]:
    """Decode, normalise, letterbox and encode one frame: ``(uint16 size x size, encoding)``.

    Padding is 0 in both stored encodings (air at HU -1024 for ``hu``, black for ``unit``).
    Raises ``PixelDataError``; ``blank`` for a frame of one value (nothing to learn from it).
    """
    decoded = load_frame_info(source, frame)
    pixels = decoded.pixels
    if pixels.size == 0 or float(pixels.min()) == float(pixels.max()):
        raise PixelDataError("blank")
    values, encoding = normalise(pixels, decoded.modality, decoded.photometric, hounsfield=decoded.hounsfield)
    if encoding == "hu":
        # Below air is padding outside the scan field (-2000, -3024): clip first so resizing does
        # not smear it into the edge of the field of view.
        np.clip(values, -HU_OFFSET, None, out=values)
        resized = resize_square(values, size, fill=-HU_OFFSET, aspect=decoded.aspect)
        return encode_hu(resized), encoding
    resized = resize_square(values, size, fill=0.0, aspect=decoded.aspect)
    return encode_unit(resized), encoding
