"""De-identification on the way into the archive: DICOM PS3.15 Annex E, done before anything is written.

The profile is the Basic Application Level Confidentiality Profile with two options, the ones a
pretraining archive needs (E.3):
- Retain Longitudinal Temporal Information with Modified Dates: every date and date-time of one
  patient moves by one offset (62 to 730 days back), so intervals between a patient's studies
  survive and the calendar does not;
- Clean Descriptors: study/series/protocol descriptions are kept, with anything that names this
  patient, site or staff and every run of four or more digits taken out; free-text comments go;
and without Retain Device Identity: serial numbers and device IDs go, station names are replaced.

Pseudonyms come from HMAC-SHA256 under the site secret: the same patient always gets the same
PatientID (patient-level splits still work across pulls), every UID maps to the same ``2.25.``
UID (PS3.5 B.2) wherever it appears, and without the secret nothing can be reversed.

The engine is dicognito (MIT, pydicom 3): its per-element handlers replace person names with dummy
names, IDs and accession numbers with random IDs, addresses and institutions with fictitious ones
and shift dates. It is seeded per patient with a keyed hash, which is what makes its date offset
per patient. We add what it lacks for the profile: keyed ``2.25`` UIDs instead of its unrooted
``2.<md5>`` ones, the removal list of Table E.1-1 (private tags, overlays, curves, comments,
patient characteristics, device identity), the descriptor cleaning and the coded
De-identification Method. ``deid`` (the CTP-recipe library) was the alternative; its recipes would
have needed the same per-patient dates and keyed UIDs written as custom functions, and it pulls
in matplotlib.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicognito.anonymizer import Anonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom import DataElement
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

MIN_SECRET_BYTES = 16
ANONYMIZER_CACHE = 1024  # patients whose dicognito engine is kept (building one is cheap, not free)
DICOM_UID_ROOT = "1.2.840.10008."  # UIDs the standard defines identify no patient

# Table E.1-1 attributes removed (action X, or X/Z/D where removing is allowed): comments, patient
# characteristics (no Retain Patient Characteristics option), device identity (no Retain Device
# Identity option) and the rest of what dicognito leaves in place.
REMOVE: frozenset[str] = frozenset({
    "AcquisitionComments", "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence",
    "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService", "CassetteID",
    "CommentsOnThePerformedProcedureStep", "ConfidentialityConstraintOnPatientDataDescription",
    "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation", "CustodialOrganizationSequence",
    "DataSetTrailingPadding", "DetectorID", "DeviceSerialNumber", "DeviceUID", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName", "EncryptedAttributesSequence",
    "EthnicGroup", "FrameComments", "GantryID", "GeneratorID", "IconImageSequence", "ImagePresentationComments",
    "InstitutionAddress", "InstitutionCodeSequence", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "IssuerOfAdmissionID", "IssuerOfAdmissionIDSequence",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "LastMenstrualDate", "MACParametersSequence",
    "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence",
    "NameOfPhysiciansReadingStudy", "Occupation", "OperatorIdentificationSequence", "OriginalAttributesSequence",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress", "PatientAge",
    "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName", "PatientPrimaryLanguageCodeSequence", "PatientReligiousPreference",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers",
    "PatientWeight", "PerformedLocation", "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlateID", "PregnancyStatus", "ReferencedPatientPhotoSequence", "ReferencedPatientSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestingPhysician", "RequestingService",
    "ResponsibleOrganization", "ResponsiblePerson", "ScheduledProcedureStepDescription", "ServiceEpisodeDescription",
    "SmokingStatus", "SpecialNeeds", "StudyComments", "TextComments", "TextString", "TopicAuthor",
    "TopicKeywords", "TopicSubject", "TopicTitle", "VisitComments",
})
# Zero-length (action Z) where the attribute is type 2 in most IODs and must stay present.
# (AccessionNumber and StudyID, also Z, get dicognito's dummy IDs: the same source value, the same dummy.)
EMPTY: frozenset[str] = frozenset({"PatientBirthDate", "PatientSex", "ReferringPhysicianName"})
# Descriptors kept under the Clean Descriptors option (action C), cleaned of identifying text.
CLEAN: frozenset[str] = frozenset({
    "AcquisitionDeviceProcessingDescription", "DerivationDescription", "PerformedProcedureStepDescription",
    "ProtocolName", "RequestedProcedureDescription", "SeriesDescription", "StudyDescription", "ImageComments",
    "ReasonForStudy", "AdmittingDiagnosesDescription",
})
# PS3.16 CID 7050 codes for the De-identification Method Code Sequence.
METHOD_CODES: tuple[tuple[str, str], ...] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113105", "Clean Descriptors Option"),
)
METHOD_TEXT = "PS3.15 Basic; Longitudinal Modified Dates; Clean Descriptors"  # LO: 64 characters at most
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
ULTRASOUND_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
})
DIGITS = re.compile(r"\d{1,4}[-./]\d{1,2}[-./]\d{1,4}|\d{4,}")  # written dates first, then 4+ digits
SPACES = re.compile(r"\s+")


class SecretError(ValueError):
    """The site secret is missing or too short; the message says how to make one."""


def read_secret(path: Path) -> bytes:
    """The site secret from ``path``: at least 16 bytes, kept by the site, never beside the archive."""
    if not path.is_file():
        raise SecretError(f"--secret-file {path} does not exist; create one once per site with "
                          f"'head -c 32 /dev/urandom > {path}' and keep it apart from the archive")
    secret = path.read_bytes()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"--secret-file {path} holds {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
    return secret


@dataclass(frozen=True)
class DeidPolicy:
    """Which images may come in. Secondary captures and ultrasound often carry burned-in names
    (screenshots, scanner overlays), so a site must opt in to them."""

    keep_secondary_capture: bool = False
    keep_ultrasound: bool = False

    def leave_out(self, ds: Dataset) -> str | None:
        """Why this instance must stay out of the archive, or ``None``."""
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return "no-pixel-data"
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            return "burned-in-annotation"
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", "")).upper()
        if not self.keep_secondary_capture and (sop_class in SECONDARY_CAPTURE_CLASSES or modality == "SC"):
            return "secondary-capture"
        if not self.keep_ultrasound and (sop_class in ULTRASOUND_CLASSES or modality == "US"):
            return "ultrasound"
        return None


class KeyedUIDs(ElementAnonymizer):
    """Every instance UID to ``2.25.<HMAC>``: the same source UID gives the same UID in every file,
    study and pull. Class UIDs, transfer syntaxes and the standard's own UIDs are kept."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def uid(self, value: str) -> str:
        digest = hmac.new(self._secret, b"uid:" + value.encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def _keeps(self, element: DataElement, value: str) -> bool:
        keyword = keyword_for_tag(element.tag)
        return keyword.endswith("ClassUID") or keyword == "TransferSyntaxUID" or value.startswith(DICOM_UID_ROOT)

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        if data_element.VR != "UI" or not data_element.value:
            return False
        values = data_element.value if data_element.VM > 1 else [data_element.value]
        mapped = [str(v) if self._keeps(data_element, str(v)) else self.uid(str(v)) for v in values]
        data_element.value = mapped if data_element.VM > 1 else mapped[0]
        return True

    def describe_actions(self) -> Iterator[str]:
        yield "Replace instance UIs with 2.25 UIDs from HMAC-SHA256 under the site secret"


class DescriptorCleaner:
    """Clean Descriptors (action C): keep the description, less any identifying value of this
    instance (names, IDs, institution, station) and any written date or run of 4+ digits (MRNs, phones)."""

    def __init__(self, identifying: tuple[str, ...]) -> None:
        # Longest first, so "SMITH^JOHN" goes before "SMITH" would leave "^JOHN".
        self._identifying = sorted({v for v in identifying if len(v) >= 2}, key=len, reverse=True)

    def clean(self, text: str) -> str:
        for value in self._identifying:
            text = re.sub(re.escape(value), " ", text, flags=re.IGNORECASE)
        return SPACES.sub(" ", DIGITS.sub(" ", text)).strip()


def identifying_values(ds: Dataset) -> tuple[str, ...]:
    """The values of ``ds`` that a free-text descriptor must not repeat, name parts included."""
    values: list[str] = []
    for element in ds.iterall():
        keyword = keyword_for_tag(element.tag)
        if element.VR == "PN" and element.value:
            for name in element.value if element.VM > 1 else [element.value]:
                values.append(str(name))
                values.extend(part for part in re.split(r"[\^=\s]+", str(name)) if len(part) >= 3)
        elif keyword in ("PatientID", "AccessionNumber", "OtherPatientIDs", "InstitutionName", "StationName",
                         "InstitutionalDepartmentName", "InstitutionAddress", "StudyID") and element.value:
            values.append(str(element.value))
    return tuple(values)


def _strip(ds: Dataset, cleaner: DescriptorCleaner) -> None:
    """Table E.1-1 removals and cleaning, in ``ds`` and every nested item: the listed attributes,
    private tags, overlays (60xx, may hold annotations), curves (50xx) and the descriptors."""
    ds.remove_private_tags()
    for tag in [e.tag for e in ds if e.tag.group & 0xFF00 in (0x5000, 0x6000)]:
        del ds[tag]
    present = set(ds.dir())
    for keyword in REMOVE & present:
        delattr(ds, keyword)
    for keyword in EMPTY & present:
        ds[keyword].value = ""
    for keyword in CLEAN & present:
        if ds[keyword].value:
            ds[keyword].value = cleaner.clean(str(ds[keyword].value))
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _strip(item, cleaner)


def _method_codes() -> Sequence:
    items = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    return Sequence(items)


class Deidentifier:
    """De-identifies one instance at a time, in place, consistently across instances, runs and hosts
    that share the site secret. Thread-safe: C-STORE handlers of concurrent retrievals share one."""

    def __init__(self, secret: bytes, policy: DeidPolicy | None = None) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"secret: {len(secret)} bytes, at least {MIN_SECRET_BYTES} needed")
        self._secret = secret
        self.policy = policy or DeidPolicy()
        self._uids = KeyedUIDs(secret)
        self._engines: OrderedDict[str, Anonymizer] = OrderedDict()
        self._lock = threading.Lock()

    def _keyed(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, issuer: str, patient_id: str) -> str:
        """The PatientID this patient has in the archive (also its PatientName): 20 characters."""
        digest = self._keyed("patient", f"{issuer}\\{patient_id}")
        return "PSN" + base64.b32encode(digest[:10]).decode().rstrip("=")[:16]

    def uid(self, source_uid: str) -> str:
        """The archive's UID for ``source_uid`` (what the pull ledger and the tests look up)."""
        return self._uids.uid(source_uid)

    def ledger_key(self, source_uid: str) -> str:
        """A keyed digest of a source UID: the pull ledger records these, never the UIDs."""
        return self._keyed("ledger", source_uid).hex()[:32]

    def _engine(self, patient_key: str) -> Anonymizer:
        """dicognito seeded for this patient: its date offset and dummy values follow the patient."""
        with self._lock:
            engine = self._engines.get(patient_key)
            if engine is None:
                engine = Anonymizer(seed=self._keyed("dates", patient_key).hex())
                engine.add_element_handler(self._uids)
                self._engines[patient_key] = engine
                if len(self._engines) > ANONYMIZER_CACHE:
                    self._engines.popitem(last=False)
            else:
                self._engines.move_to_end(patient_key)
            return engine

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (after ``policy.leave_out`` said it may come in) and give it
        a file meta of its own; returns it."""
        issuer, patient_id = str(ds.get("IssuerOfPatientID", "")), str(ds.get("PatientID", ""))
        transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        pseudonym = self.pseudonym(issuer, patient_id)
        ds.file_meta = FileMetaDataset()
        _strip(ds, DescriptorCleaner(identifying_values(ds)))
        self._engine(f"{issuer}\\{patient_id}").anonymize(ds)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = METHOD_TEXT
        ds.DeidentificationMethodCodeSequence = _method_codes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID(transfer_syntax or ExplicitVRLittleEndian)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        return ds
