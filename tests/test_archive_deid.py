"""The archive's de-identifier (PS3.15 Basic Profile, Retain Longitudinal Temporal Information with
Modified Dates, Clean Descriptors) and ``pacsnode archive deid`` on an exported folder."""

from __future__ import annotations

import copy
import io
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, UltrasoundImageStorage
from typer.testing import CliRunner

from node.archive.command import app
from node.archive.deid import Deidentifier, DeidPolicy, SecretError, read_secret
from node.synth import generate

SECRET = b"0123456789abcdef-site-secret"


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("exported")
    generate(folder, studies=3, kinds="cxr", seed=11, cxr_size=64)
    return folder / "dicom"


@pytest.fixture
def radiograph(phantom_folder: Path) -> Dataset:
    ds = pydicom.dcmread(next(phantom_folder.rglob("*.dcm")))
    ds.StudyDescription = f"CHEST {ds.PatientName} {ds.PatientID} 2024-05-06 PA"
    ds.ImageComments = f"seen by Dr {ds.ReferringPhysicianName}"
    ds.PatientComments = "call home"
    ds.DeviceSerialNumber = "SN-778899"
    ds.OtherPatientIDs = "OLD-MRN-1"
    ds.add_new(0x60003000, "OW", b"\x00" * 16)  # an overlay plane: may hold an annotation
    ds.private_block(0x0011, "VENDOR", create=True).add_new(0x10, "LO", "PRIVATE")
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedSOPClassUID = ds.SOPClassUID
    ds.SourceImageSequence = [item]
    return ds


def test_the_profile_removes_replaces_and_shifts(radiograph: Dataset) -> None:
    original = copy.deepcopy(radiograph)
    deid = Deidentifier(SECRET)
    ds = deid.deidentify(radiograph)
    for keyword in ("PatientComments", "DeviceSerialNumber", "OtherPatientIDs", "PatientAge", "IssuerOfPatientID"):
        assert keyword not in ds, keyword
    assert 0x60003000 not in ds and not any(e.tag.is_private for e in ds)
    assert ds.PatientBirthDate == "" and ds.ReferringPhysicianName == ""
    assert ds.PatientID == ds.PatientName == deid.pseudonym("PACSNODE-SYNTH", original.PatientID)
    # Clean Descriptors: the description stays, the name, the ID and the date in it do not.
    assert ds.StudyDescription == "CHEST PA" and ds.ImageComments == "seen by Dr"
    # Keyed UIDs, the same wherever the UID appears; class UIDs kept.
    assert ds.SOPInstanceUID == deid.uid(original.SOPInstanceUID) and ds.SOPInstanceUID.startswith("2.25.")
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == original.SOPClassUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyDate != original.StudyDate
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    # It survives a round trip through bytes as a valid Part 10 file.
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert again.SOPInstanceUID == ds.SOPInstanceUID and again.pixel_array.shape == original.pixel_array.shape


def test_dates_move_per_patient_and_keep_intervals(radiograph: Dataset) -> None:
    deid = Deidentifier(SECRET)
    later = copy.deepcopy(radiograph)
    later.StudyDate = "20250301"
    other = copy.deepcopy(radiograph)
    other.PatientID = "SOMEONE-ELSE"
    day = "%Y%m%d"
    first_date, later_date = radiograph.StudyDate, later.StudyDate
    a, b, c = (deid.deidentify(copy.deepcopy(ds)) for ds in (radiograph, later, other))
    interval = datetime.strptime(later_date, day) - datetime.strptime(first_date, day)
    assert datetime.strptime(b.StudyDate, day) - datetime.strptime(a.StudyDate, day) == interval
    assert a.StudyDate != c.StudyDate and a.PatientID != c.PatientID
    # Another de-identifier with the same secret (another host, another run) agrees; another secret does not.
    assert Deidentifier(SECRET).deidentify(copy.deepcopy(radiograph)).StudyDate == a.StudyDate
    assert Deidentifier(b"another secret of 16+").deidentify(copy.deepcopy(radiograph)).PatientID != a.PatientID


def test_images_that_may_show_identity_stay_out_unless_the_site_opts_in(radiograph: Dataset) -> None:
    burned, sc, us = (copy.deepcopy(radiograph) for _ in range(3))
    burned.BurnedInAnnotation = "YES"
    sc.SOPClassUID = SecondaryCaptureImageStorage
    us.SOPClassUID, us.Modality = UltrasoundImageStorage, "US"
    no_pixels = copy.deepcopy(radiograph)
    del no_pixels.PixelData
    default = DeidPolicy()
    assert [default.leave_out(ds) for ds in (radiograph, burned, sc, us, no_pixels)] == \
        [None, "burned-in-annotation", "secondary-capture", "ultrasound", "no-pixel-data"]
    opted_in = DeidPolicy(keep_secondary_capture=True, keep_ultrasound=True)
    assert [opted_in.leave_out(ds) for ds in (burned, sc, us)] == ["burned-in-annotation", None, None]


def test_the_secret_is_required_and_long_enough(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="head -c 32 /dev/urandom"):
        read_secret(tmp_path / "missing")
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(SecretError, match="at least 16"):
        read_secret(tmp_path / "short")


def test_archive_deid_on_an_exported_folder(phantom_folder: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (phantom_folder.parent / "notes.txt").write_text("not DICOM")
    out = tmp_path / "archive"
    result = CliRunner().invoke(app, ["deid", str(phantom_folder.parent), str(out), "--secret-file", str(secret)])
    assert result.exit_code == 0, result.output
    sources = [pydicom.dcmread(p) for p in phantom_folder.parent.rglob("*.dcm")]  # images and their SEGs
    written = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    assert {ds.SOPInstanceUID for ds in written} == {Deidentifier(SECRET).uid(ds.SOPInstanceUID) for ds in sources}
    assert "not readable as DICOM" in result.output  # notes.txt (and the CSVs) counted, not fatal
    inside = CliRunner().invoke(app, ["deid", str(phantom_folder), str(phantom_folder / "out"), "--secret-file",
                                      str(secret)])
    assert inside.exit_code == 2 and "must live apart" in inside.output
    missing = CliRunner().invoke(app, ["deid", str(phantom_folder), str(out), "--secret-file", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    node_config = tmp_path / "node.yaml"
    node_config.write_text(f"node:\n  data_dir: {tmp_path / 'node-data'}\n")
    clinical = CliRunner().invoke(app, ["deid", str(phantom_folder), str(tmp_path / "node-data" / "archive"),
                                        "--secret-file", str(secret), "--config", str(node_config)])
    assert clinical.exit_code == 2 and "lives apart from the clinical store" in clinical.output, clinical.output
