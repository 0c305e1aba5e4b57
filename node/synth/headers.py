"""DICOM headers of the phantom images: one function per IOD (DX, CT, MR) over shared modules.

Headers are built as real modalities fill them (PS3.3): Patient, General Study, Patient Study,
General Series, Frame of Reference, General Equipment, General Image/Acquisition, Image Plane,
Image Pixel, the modality's image module, VOI LUT and SOP Common. Every value comes from the
study plan or from the geometry the pixels were sampled on; dates and times are the study's,
never the clock's, so files are byte-identical between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from node.synth.determinism import derive_uid
from node.synth.grid import AxialGrid
from node.synth.roster import StudyPlan

MANUFACTURER = "pacsnode-synth"
SOFTWARE_VERSION = "pacsnode-synth 1"
INSTITUTION = "Phantom General Hospital"
DEPARTMENT = "Radiology"
REFERRING_PHYSICIAN = "REFERRER^SYNTHETIC"
IMPLEMENTATION_VERSION_NAME = "PACSNODE_SYNTH1"
IMPLEMENTATION_CLASS_UID = derive_uid("implementation-class")


@dataclass(frozen=True)
class SeriesInfo:
    """Identity of one series of a study."""

    plan: StudyPlan
    series_uid: str
    frame_of_reference_uid: str
    number: int
    description: str
    start: datetime  # series / acquisition date-time


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def _code(code: Code) -> Dataset:
    """A code sequence item from a code of pydicom's DICOM code dictionary (values checked there)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _ds(value: float) -> str:
    """A DS string of at most 16 characters, without float noise (``'0.46875'``, not ``0.4687500001``)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _instance(template: Dataset, sop_uid: str, instance_number: int) -> Dataset:
    """A new instance of a series: the template's (shared, never mutated) elements, own identity.

    Sharing the series-level elements instead of setting a hundred attributes per slice makes
    long series several times faster to build. Per-instance attributes are never in a template.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.SOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds = Dataset()
    for element in template:
        ds.add(element)
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    return ds


def _base(series: SeriesInfo, sop_class_uid: str, modality: str) -> Dataset:
    """Patient, Study, Series, Equipment, SOP Common: the series-level part of every instance."""
    plan, patient = series.plan, series.plan.patient
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = _da(series.start)
    ds.InstanceCreationTime = _tm(series.start)
    ds.SOPClassUID = sop_class_uid
    ds.StudyDate = _da(plan.study_datetime)
    ds.SeriesDate = _da(series.start)
    ds.AcquisitionDate = _da(series.start)
    ds.ContentDate = _da(series.start)
    if modality == "DX":
        ds.AcquisitionTime = _tm(series.start)
        ds.ContentTime = _tm(series.start)
    ds.StudyTime = _tm(plan.study_datetime)
    ds.SeriesTime = _tm(series.start)
    ds.AccessionNumber = f"ACC{plan.number:07d}"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Phantom Road, Nowhere"
    ds.ReferringPhysicianName = REFERRING_PHYSICIAN
    ds.StationName = f"SYNTH-{modality}"
    ds.StudyDescription = series.description.split(" ", 1)[0] + " " + _study_title(modality)
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = DEPARTMENT
    ds.OperatorsName = "OPERATOR^SYNTHETIC"
    ds.ManufacturerModelName = f"Phantom {modality}"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "PACSNODE-SYNTH"
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age_at(plan.study_datetime.date())
    ds.PatientIdentityRemoved = "NO"
    ds.DeviceSerialNumber = f"SYN{modality}0001"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = f"S{plan.number:06d}"
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _study_title(modality: str) -> str:
    return {"DX": "CHEST PA", "CT": "HEAD WO CONTRAST", "MR": "BRAIN W CONTRAST"}.get(modality, modality)


def _pixel_module(ds: Dataset, rows: int, cols: int, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _pixel_data(ds: Dataset, pixels: npt.NDArray[np.integer], signed: bool) -> None:
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()


def _plane(ds: Dataset, series: SeriesInfo, grid: AxialGrid) -> None:
    """Series-constant part of the Image Plane and Frame of Reference modules."""
    ds.PixelSpacing = [_ds(grid.pixel_spacing), _ds(grid.pixel_spacing)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = _ds(grid.slice_spacing)
    ds.SpacingBetweenSlices = _ds(grid.slice_spacing)
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _slice(template: Dataset, series: SeriesInfo, sop_uid: str, grid: AxialGrid, k: int) -> Dataset:
    """Slice ``k`` of an axial series: position straight from the grid its pixels came from."""
    ds = _instance(template, sop_uid, k + 1)
    z = grid.z0 + k * grid.slice_spacing
    ds.ImagePositionPatient = [_ds(grid.x0), _ds(grid.y0), _ds(z)]
    ds.SliceLocation = _ds(z)
    # Slices are acquired in order, a moment apart.
    moment = series.start + timedelta(seconds=k)
    ds.AcquisitionTime = _tm(moment)
    ds.ContentTime = _tm(moment)
    return ds


def dx_dataset(
    series: SeriesInfo, sop_uid: str, pixels: npt.NDArray[np.uint16], pixel_spacing: float, bits_stored: int
) -> Dataset:
    """A Digital X-Ray Image "For Presentation": PA chest, 12-bit MONOCHROME2."""
    template = _base(series, DigitalXRayImageStorageForPresentation, "DX")
    ds = _instance(template, sop_uid, 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Chest)])
    view = _code(codes.cid4010.PosteroAnterior)
    view.ViewModifierCodeSequence = Sequence([])
    ds.ViewCodeSequence = Sequence([view])
    ds.PatientPosition = ""
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "SYNTHDET1"
    ds.ImagerPixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
    ds.DistanceSourceToDetector = "1800"
    ds.DistanceSourceToPatient = "1640"
    ds.EstimatedRadiographicMagnificationFactor = _ds(1800 / 1640)
    ds.PositionerType = "NONE"
    ds.KVP = "125"
    ds.ExposureTime = "8"
    ds.XRayTubeCurrent = "320"
    ds.Exposure = "3"
    ds.Grid = "FOCUSED"
    ds.AcquisitionContextSequence = Sequence([])
    _pixel_module(ds, pixels.shape[0], pixels.shape[1], bits_stored, signed=False)
    _pixel_data(ds, pixels, signed=False)
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1  # higher values: less beam intensity (more attenuation)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    top = (1 << bits_stored) - 1
    ds.WindowCenter = _ds(top / 2 + 1)
    ds.WindowWidth = _ds(top + 1)
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.VOILUTFunction = "LINEAR"
    return ds


def ct_template(series: SeriesInfo, grid: AxialGrid, intercept: float) -> Dataset:
    """Series-level header of an axial head CT (CT Image Storage), HU = stored + ``intercept``."""
    ds = _base(series, CTImageStorage, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.ProtocolName = "Routine Head"
    ds.ScanOptions = "HELICAL MODE"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "250"
    ds.ReconstructionDiameter = _ds(grid.pixel_spacing * grid.size)
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "300"
    ds.Exposure = "300"
    ds.FilterType = "HEAD FILTER"
    ds.GeneratorPower = "36"
    ds.FocalSpots = "0.7"
    ds.ConvolutionKernel = "H30s"
    ds.RevolutionTime = 1.0
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 19.2
    ds.SpiralPitchFactor = 0.55
    ds.CTDIvol = 55.0
    ds.CTDIPhantomTypeCodeSequence = Sequence([_code(codes.DCM.IECHeadDosimetryPhantom)])
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Head)])
    _plane(ds, series, grid)
    _pixel_module(ds, grid.size, grid.size, 16, signed=True)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "600"]
    ds.WindowWidth = ["80", "2800"]
    ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
    return ds


def ct_dataset(
    template: Dataset,
    series: SeriesInfo,
    sop_uid: str,
    grid: AxialGrid,
    k: int,
    pixels: npt.NDArray[np.int16],
) -> Dataset:
    """Slice ``k`` of the head CT whose series header is ``template``."""
    ds = _slice(template, series, sop_uid, grid, k)
    _pixel_data(ds, pixels, signed=True)
    return ds


def mr_template(series: SeriesInfo, grid: AxialGrid) -> Dataset:
    """Series-level header of an axial post-contrast T1 spin-echo brain MR (MR Image Storage)."""
    ds = _base(series, MRImageStorage, "MR")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.ProtocolName = "T1 SE AX POST GD"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "se2d1"
    ds.AngioFlag = "N"
    ds.RepetitionTime = "550"
    ds.EchoTime = "12"
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.676"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = "1.5"
    ds.NumberOfPhaseEncodingSteps = grid.size
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "150"
    ds.ReceiveCoilName = "HeadNeck_20"
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = [0, grid.size, grid.size, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = "90"
    ds.SAR = "0.8"
    ds.dBdt = "0"
    ds.PatientWeight = "70"
    ds.ContrastBolusAgent = "Gadobutrol 1.0 mmol/mL"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = "7.5"
    ds.ContrastBolusIngredient = "GADOLINIUM"
    ds.ContrastBolusIngredientConcentration = "1000"
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Brain)])
    _plane(ds, series, grid)
    _pixel_module(ds, grid.size, grid.size, 12, signed=False)
    ds.WindowCenter = "800"
    ds.WindowWidth = "1600"
    return ds


def mr_dataset(
    template: Dataset,
    series: SeriesInfo,
    sop_uid: str,
    grid: AxialGrid,
    k: int,
    pixels: npt.NDArray[np.uint16],
) -> Dataset:
    """Slice ``k`` of the brain MR whose series header is ``template``."""
    ds = _slice(template, series, sop_uid, grid, k)
    _pixel_data(ds, pixels, signed=False)
    return ds
