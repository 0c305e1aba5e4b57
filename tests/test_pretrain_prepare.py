"""pretrain.decode and pretrain.prepare on real files: every transfer syntax against its
uncompressed reference, Hounsfield units, MONOCHROME1, letterboxing, and shards from an index of
a synth archive (strided volumes, labels, determinism, pixel data broken after indexing).

Compressed references come from pydicom's test files and pydicom-data, and from CT_small encoded
here with GDCM (JPEG family) and pydicom's own encoders (RLE, JPEG-LS, JPEG 2000, deflate).
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from node.synth import Manifest, generate
from pretrain.decode import PixelDataError, load_frame, normalise, prepare_image, resize_square
from pretrain.index import build_index, open_index
from pretrain.labels import load_labels
from pretrain.prepare import prepare_shards, sample_slices, select_frames
from pretrain.shards import HU_OFFSET, ShardSet, decode_hu, decode_unit

SMALL = {"ct_slices": 8, "mr_slices": 8, "ct_size": 128, "mr_size": 128, "cxr_size": 256}


def sample_file(name: str) -> Path:
    """A file of pydicom's test files or of pydicom-data, never downloaded."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(str(found))


def assert_same_image(reference: np.ndarray, other: np.ndarray, lossy: bool) -> None:
    assert other.shape == reference.shape and other.dtype == np.float32
    if not lossy:
        np.testing.assert_array_equal(other, reference)
        return
    spread = float(reference.max() - reference.min())
    assert float(np.abs(other - reference).mean()) < 0.02 * spread
    assert np.corrcoef(reference.ravel(), other.ravel())[0, 1] > 0.99


# (reference, other, frame, lossy): each line covers a transfer syntax or a photometric case.
PAIRS = [
    ("MR_small.dcm", "MR_small_implicit.dcm", 0, False),  # implicit VR little endian
    ("MR_small.dcm", "MR_small_bigendian.dcm", 0, False),  # explicit VR big endian
    ("MR_small.dcm", "MR_small_RLE.dcm", 0, False),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0, False),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0, False),
    ("emri_small.dcm", "emri_small_RLE.dcm", 7, False),  # enhanced MR, multi-frame
    ("emri_small.dcm", "emri_small_big_endian.dcm", 7, False),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 7, False),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 7, False),
    ("693_UNCR.dcm", "693_J2KR.dcm", 0, False),  # CT, JPEG 2000 lossless
    ("693_UNCI.dcm", "693_J2KI.dcm", 0, True),  # CT, JPEG 2000 lossy
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm", 0, False),  # CR, MONOCHROME1
    ("US1_UNCR.dcm", "US1_J2KR.dcm", 0, False),  # US, YBR_RCT
    ("US1_UNCI.dcm", "US1_J2KI.dcm", 0, True),  # US, YBR_ICT
    ("SC_rgb.dcm", "SC_rgb_expb.dcm", 0, False),  # RGB big endian
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", 0, False),
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", 0, False),  # JPEG lossless SV1, RGB
    ("SC_rgb.dcm", "SC_rgb_gdcm_KY.dcm", 0, False),  # JPEG 2000, RGB
    ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", 0, True),  # JPEG baseline, RGB
    ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", 0, True),  # JPEG baseline, YBR_FULL
    ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 0, True),  # JPEG baseline, YBR_FULL_422
    ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 0, True),  # native YBR_FULL
    ("SC_rgb.dcm", "SC_rgb_jls_lossy_line.dcm", 0, True),  # JPEG-LS near-lossless
    ("SC_rgb_jpeg_dcmd.dcm", "SC_rgb_jpeg.dcm", 0, False),  # JPEG baseline vs DCMTK's decompression
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", 0, False),  # palette colour, big endian
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 0, False),
]


@pytest.mark.parametrize(("reference", "other", "frame", "lossy"), PAIRS, ids=[pair[1] for pair in PAIRS])
def test_transfer_syntax_decodes_like_its_uncompressed_reference(
    reference: str, other: str, frame: int, lossy: bool
) -> None:
    assert_same_image(load_frame(sample_file(reference), frame), load_frame(sample_file(other), frame), lossy)


def test_jpeg_extended_12_bit_and_lossless_sv1_files_decode() -> None:
    # pydicom's own reference values for its 12-bit JPEG Extended test image.
    extended = load_frame(sample_file("JPGExtended.dcm"))
    assert extended.shape == (1024, 256)
    assert (extended[420, 140], extended[230, 120]) == (244, 95)
    lossless = load_frame(sample_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert lossless.shape == (768, 1024) and lossless.max() > lossless.min()
    deflated = pydicom.dcmread(sample_file("image_dfl.dcm"))
    np.testing.assert_array_equal(load_frame(sample_file("image_dfl.dcm")), deflated.pixel_array.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# CT_small in every transfer syntax: Hounsfield units must survive each of them


def _ct_hu() -> np.ndarray:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _gdcm_encode(source: Path, target: Path, transfer_syntax: int, quality: int | None = None) -> Path:
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(transfer_syntax))
    change.SetInput(reader.GetImage())
    if quality is not None:
        codec = gdcm.JPEGCodec()
        codec.SetLossless(False)
        codec.SetQuality(quality)
        change.SetUserCodec(codec)
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def _ct_12_bit(folder: Path) -> Path:
    """CT_small stored as 12-bit unsigned (HU + 1024): what 12-bit JPEG extended can carry."""
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.PixelData = np.clip(_ct_hu() + 1024, 0, 4095).astype(np.uint16).tobytes()
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    path = folder / "ct12.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _pydicom_encoded(transfer_syntax: str) -> Callable[[Path], Path]:
    def encode(folder: Path) -> Path:
        ds = pydicom.dcmread(sample_file("CT_small.dcm"))
        if transfer_syntax in (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        else:
            ds.compress(transfer_syntax)
        path = folder / f"ct-{transfer_syntax}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return encode


def _gdcm_encoded(transfer_syntax: int, twelve_bit: bool, quality: int | None = None) -> Callable[[Path], Path]:
    def encode(folder: Path) -> Path:
        source = _ct_12_bit(folder) if twelve_bit else sample_file("CT_small.dcm")
        return _gdcm_encode(source, folder / f"ct-gdcm-{transfer_syntax}.dcm", transfer_syntax, quality)

    return encode


T = gdcm.TransferSyntax
CT_ENCODINGS: dict[str, tuple[Callable[[Path], Path], str, float]] = {
    # name: (encoder, expected transfer syntax UID, tolerated mean HU error)
    "implicit": (_pydicom_encoded(ImplicitVRLittleEndian), ImplicitVRLittleEndian, 0.0),
    "deflate": (_pydicom_encoded(DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian, 0.0),
    "rle": (_pydicom_encoded(RLELossless), RLELossless, 0.0),
    "jpeg-ls": (_pydicom_encoded(JPEGLSLossless), JPEGLSLossless, 0.0),
    "j2k": (_pydicom_encoded(JPEG2000Lossless), JPEG2000Lossless, 0.0),
    "jpeg-lossless-sv1": (_gdcm_encoded(T.JPEGLosslessProcess14_1, False), "1.2.840.10008.1.2.4.70", 0.0),
    "jpeg-lossless-sv1-12bit": (_gdcm_encoded(T.JPEGLosslessProcess14_1, True), "1.2.840.10008.1.2.4.70", 0.0),
    "jpeg-lossless-p14": (_gdcm_encoded(T.JPEGLosslessProcess14, True), "1.2.840.10008.1.2.4.57", 0.0),
    "jpeg-extended-12bit": (_gdcm_encoded(T.JPEGExtendedProcess2_4, True, 95), "1.2.840.10008.1.2.4.51", 4.0),
}


@pytest.mark.parametrize("name", list(CT_ENCODINGS))
def test_ct_hounsfield_units_survive_every_transfer_syntax(name: str, tmp_path: Path) -> None:
    encode, uid, tolerance = CT_ENCODINGS[name]
    path = encode(tmp_path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    reference = np.clip(_ct_hu(), -1024, 3071)  # what 12 bits above -1024 can hold
    decoded = np.clip(load_frame(path), -1024, 3071)
    error = float(np.abs(decoded - reference).mean())
    assert error <= tolerance
    if tolerance == 0.0:
        np.testing.assert_array_equal(decoded, reference)


def test_jpeg_baseline_8_bit_grey(tmp_path: Path) -> None:
    reference = load_frame(sample_file("image_dfl.dcm"))  # 8-bit grey; re-encode it as JPEG baseline
    ds = pydicom.dcmread(sample_file("image_dfl.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    baseline = _gdcm_encode(plain, tmp_path / "baseline.dcm", T.JPEGBaselineProcess1, quality=90)
    assert pydicom.dcmread(baseline, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert_same_image(reference, load_frame(baseline), lossy=True)


def test_ct_stored_values_decode_back_to_hounsfield_units() -> None:
    hu = _ct_hu()
    stored, encoding = prepare_image(sample_file("CT_small.dcm"), 0, 128)  # 128 x 128: no resampling
    assert encoding == "hu" and stored.dtype == np.uint16 and stored.shape == (128, 128)
    np.testing.assert_array_equal(decode_hu(stored), np.clip(hu, -HU_OFFSET, None))
    assert -1100 < float(hu.min()) and float(hu.max()) > 1000  # real values: air-ish to bone
    # Downsampled, the mean HU stays (anti-aliased bilinear preserves the average).
    small, _ = prepare_image(sample_file("CT_small.dcm"), 0, 64)
    assert float(decode_hu(small).mean()) == pytest.approx(float(np.clip(hu, -1024, None).mean()), abs=5)


def test_secondary_capture_labelled_ct_is_not_taken_for_hounsfield_units(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")  # a screenshot
    _, encoding = prepare_image(ds, 0, 64)
    assert encoding == "unit"


def test_enhanced_ct_uses_its_functional_group_rescale() -> None:
    ds = pydicom.dcmread(sample_file("eCT_Supplemental.dcm"))
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    raw = pydicom.pixels.pixel_array(ds, index=1).astype(np.float32)
    expected = raw * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(load_frame(ds, 1), expected)
    assert float(expected.min()) == -1024


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    # A CR stored MONOCHROME1 comes out as 1 - (what the same values would give as MONOCHROME2).
    pixels = load_frame(sample_file("RG3_J2KR.dcm"))
    inverted, encoding = normalise(pixels, "CR", "MONOCHROME1")
    plain, _ = normalise(pixels, "CR", "MONOCHROME2")
    assert encoding == "unit"
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)
    # End to end: a radiograph rewritten as MONOCHROME1 is the negative of the original.
    ds = pydicom.dcmread(sample_file("RG3_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "mono2.dcm")
    one, _ = prepare_image(sample_file("RG3_UNCR.dcm"), 0, 128)
    two, _ = prepare_image(tmp_path / "mono2.dcm", 0, 128)
    np.testing.assert_allclose(decode_unit(one), 1.0 - decode_unit(two), atol=2 / 65535)


def test_letterbox_keeps_the_aspect_ratio() -> None:
    image = np.ones((1024, 256), dtype=np.float32)
    boxed = resize_square(image, 64)
    assert boxed.shape == (64, 64)
    np.testing.assert_allclose(boxed[:, 24:40], 1.0, atol=1e-5)
    assert np.all(boxed[:, :24] == 0) and np.all(boxed[:, 40:] == 0)
    stored, encoding = prepare_image(sample_file("JPEG2000_UNC.dcm"), 0, 64)  # a 1024 x 256 NM image
    assert encoding == "unit" and np.all(stored[:, :24] == 0) and np.all(stored[:, 40:] == 0)
    # Non-square pixels: a 100 x 200 image of 2 mm x 1 mm pixels is physically square.
    np.testing.assert_allclose(resize_square(np.ones((100, 200), np.float32), 32, aspect=2.0), 1.0, atol=1e-5)


def test_undecodable_and_non_pixel_objects_raise_pixel_data_error(tmp_path: Path) -> None:
    with pytest.raises(PixelDataError) as raised:
        load_frame(sample_file("MR_truncated.dcm"))
    assert raised.value.reason == "undecodable"
    with pytest.raises(PixelDataError) as raised:
        load_frame(sample_file("test-SR.dcm"))
    assert raised.value.reason == "no-pixel-data"
    with pytest.raises(PixelDataError) as raised:
        load_frame(sample_file("MR_small.dcm"), 3)
    assert raised.value.reason == "bad-frame"
    with pytest.raises(PixelDataError) as raised:
        load_frame(tmp_path / "absent.dcm")
    assert raised.value.reason == "missing-file"


def test_sample_slices_takes_a_centred_grid() -> None:
    for count in range(40):
        for stride in (1, 2, 3, 4, 7):
            taken = sample_slices(count, stride)
            assert len(taken) == math.ceil(count / stride)
            assert all(b - a == stride for a, b in itertools.pairwise(taken))
    assert list(sample_slices(8, 4)) == [1, 5]


# ---------------------------------------------------------------------------------------------
# prepare over an index of a synth archive


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(tmp_path_factory.mktemp("synth") / "set", 2, "cxr,ct-head,mr-brain", 5, **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def synth_index(synth: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index = tmp_path_factory.mktemp("index") / "index.sqlite"
    build_index([synth.out_dir], index, workers=1, progress=False)
    return index


def test_prepare_writes_strided_volumes_with_labels(synth: Manifest, synth_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = prepare_shards(
        synth_index, out, size=64, slice_stride=4, shard_size=4, labels=synth.labels_csv, workers=1, progress=False
    )
    # 4 volumes of 8 slices at stride 4 give 2 slices each; the 2 radiographs are always taken.
    assert manifest.total == 4 * math.ceil(8 / 4) + 2 == 10
    assert manifest.modalities == {"CT": 4, "DX": 2, "MR": 4}
    assert manifest.skipped == {} and manifest.studies == 6
    assert [shard.count for shard in manifest.shards] == [4, 4, 2]
    assert manifest.settings["size"] == 64 and manifest.settings["slice_stride"] == 4
    assert "any" in manifest.settings["label_columns"]  # type: ignore[operator]

    rows = {row["study_uid"]: row for row in csv.DictReader(synth.labels_csv.open())}
    shards = ShardSet(out)
    images = list(shards.iter_images())
    assert len(images) == 10
    for pixels, record in images:
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint16
        assert record.encoding == ("hu" if record.modality == "CT" else "unit")
        expected = {name: float(value) for name, value in rows[record.study_uid].items()
                    if name in manifest.settings["label_columns"] and value != ""}  # type: ignore[operator]
        assert record.labels == expected and "any" in record.labels
    ct = [pixels for pixels, record in images if record.modality == "CT"]
    assert all(-1030 < float(decode_hu(p).min()) < -900 and float(decode_hu(p).max()) > 20 for p in ct)

    # Deterministic: a run with worker processes writes byte-identical shards.
    again = tmp_path / "again"
    prepare_shards(synth_index, again, size=64, slice_stride=4, shard_size=4, labels=synth.labels_csv,
                   workers=2, progress=False)
    for name in ("shard-000000.npy", "shard-000001.npy", "shard-000002.npy", "shard-000002.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_select_frames_strides_volumes_not_radiographs(synth_index: Path) -> None:
    with open_index(synth_index) as reader:
        for series in reader.iter_series():
            chosen = select_frames(series, 3)
            if series[0].modality == "DX":
                assert chosen == series
            else:
                assert len(series) == 8 and [series.index(row) for row in chosen] == [0, 3, 6]


def test_pixel_data_broken_after_indexing_is_skipped_and_counted(synth: Manifest, tmp_path: Path) -> None:
    archive = Path(shutil.copytree(synth.out_dir / "dicom", tmp_path / "archive"))
    extra = archive / "extra"
    extra.mkdir()
    shutil.copy(sample_file("emri_small.dcm"), extra / "emri.dcm")  # 10 frames
    lossless = _gdcm_encode(sample_file("CT_small.dcm"), extra / "sv1.dcm", T.JPEGLosslessProcess14_1)
    index = tmp_path / "index.sqlite"
    summary = build_index([archive], index, workers=1, progress=False)
    assert summary.frames == 34 + 10 + 1

    # After indexing: a slice loses half its pixel bytes, a JPEG file's fragment becomes garbage,
    # a file disappears.
    first = Path(synth.of_kind("ct-head")[0].instances[0]).relative_to("dicom")
    ct_slices = sorted((archive / first).parent.glob("*.dcm"))
    data = ct_slices[0].read_bytes()
    ct_slices[0].write_bytes(data[: len(data) - 4000])
    ds = pydicom.dcmread(lossless)
    fragment = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([np.random.default_rng(1).integers(0, 256, len(fragment) + len(fragment) % 2,
                                                                   dtype=np.uint8).tobytes()])
    ds.save_as(lossless)
    ct_slices[1].unlink()

    manifest = prepare_shards(index, tmp_path / "shards", size=32, slice_stride=1, workers=1, progress=False)
    assert manifest.skipped == {"missing-file": 1, "undecodable": 2}
    assert manifest.total == summary.frames - 3
    assert manifest.modalities["MR"] == 16 + 10
    frames = sorted(record.frame for shard in range(len(manifest.shards))
                    for record in ShardSet(tmp_path / "shards").records(shard) if record.modality == "MR")
    assert frames.count(0) == 17 and max(frames) == 9

    # The same archive at stride 4: the 10-frame object gives ceil(10 / 4) = 3 frames.
    strided = prepare_shards(index, tmp_path / "strided", size=32, slice_stride=4, workers=1, progress=False)
    assert strided.modalities["MR"] == 2 * 2 + 3


def test_labels_keyed_by_sop_instance_uid(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("SOPInstanceUID,StudyInstanceUID,score,note,study_date\n1.2.3,9.9,0.5,x,20240101\n1.2.4,9.9,,y,\n")
    table = load_labels(path)
    assert table.key == "sop_uid" and table.columns == ("score",)
    assert table.lookup(sop_uid="1.2.3", study_uid="9.9") == {"score": 0.5}
    assert table.lookup(sop_uid="1.2.4", study_uid="9.9") == {}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\na,1\n")
    with pytest.raises(ValueError, match="no key column"):
        load_labels(bad)
