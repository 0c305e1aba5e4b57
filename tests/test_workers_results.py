"""workers.results: the SR, SEG, KO and SC of one model run, built from real phantom DICOM.

Every object is written to bytes, read back (pydicom, highdicom) and checked for its content, its
IHE AIR markers and the patient/study it belongs to; every one passes dciodvfy; a rebuild gives
the same bytes and a new study or model version new UIDs, with the SR superseding its predecessor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import results_support as rs
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from node.headers import PROCESSING_ALGORITHM_CODE
from node.messages import ResultKind
from node.synth import Manifest
from workers.outcome import StudyOutcome
from workers.results import ResultContext, ResultSet, build_results, result_uid
from workers.results.summary import summary_lines

KINDS = ("cxr", "ct-head", "mr-brain")
SERIES_NUMBERS = {ResultKind.SR: 9001, ResultKind.SEG: 9002, ResultKind.KO: 9003, ResultKind.SC: 9004}
PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                 "ReferringPhysicianName", "StudyDescription")
# What dciodvfy may still say: the private finding scheme is not in its table of designators, and
# its dictionary predates Device UID in the Contributing Equipment Sequence (IHE AIR puts it there).
ACCEPTED_WARNINGS = (
    "Unrecognized defined term <99PACSNODE> for value 1 of attribute <Coding Scheme Designator>",
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return rs.make_phantoms(tmp_path_factory.mktemp("results") / "phantoms")


@pytest.fixture(scope="module")
def phantoms(manifest: Manifest) -> dict[str, rs.Phantom]:
    return {kind: rs.load(manifest, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def outcomes(phantoms: dict[str, rs.Phantom]) -> dict[str, StudyOutcome]:
    return {kind: rs.make_outcome(phantom) for kind, phantom in phantoms.items()}


@pytest.fixture(scope="module")
def results(outcomes: dict[str, StudyOutcome]) -> dict[str, ResultSet]:
    return {kind: build_results(outcome, rs.CONTEXT) for kind, outcome in outcomes.items()}


def _report(sr: Dataset) -> hd.sr.MeasurementReport:
    document = hd.sr.srread(BytesIO(rs.encode(sr)))
    assert isinstance(document, hd.sr.Comprehensive3DSR) and isinstance(document.content, hd.sr.MeasurementReport)
    return document.content


def _reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(BytesIO(rs.encode(ds)))


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _uids(ds: Dataset) -> set[str]:
    """Every UID the object holds except those of what it references (for comparing versions)."""
    return {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)} | {
        str(e.value) for e in _walk(ds) if e.keyword in ("TrackingUID", "DimensionOrganizationUID")
    }


# ------------------------------------------------------------------------------------------ UIDs


def test_result_uid_is_deterministic_and_changes_with_every_input() -> None:
    base = ("2.25", "1.2.3", 1, "mr-metastasis", "1.0.0", "sr")
    uid = result_uid(*base)
    assert uid == result_uid(*base)
    assert uid.startswith("2.25.") and UID(uid).is_valid and int(uid[5:]) < 2**128
    variants = [("2.25", "1.2.3", 2, "mr-metastasis", "1.0.0", "sr"),
                ("2.25", "1.2.3", 1, "mr-metastasis", "1.0.1", "sr"),
                ("2.25", "1.2.3", 1, "mr-metastasis", "1.0.0", "seg"),
                ("2.25", "1.2.4", 1, "mr-metastasis", "1.0.0", "sr"),
                ("2.25", "1.2.3", 12, "-metastasis", "1.0.0", "sr")]
    assert len({uid, *(result_uid(*v) for v in variants)}) == len(variants) + 1
    rooted = result_uid("1.2.826.0.1.3680043.10.999", "1.2.3", 1, "m", "1", "sr")
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and UID(rooted).is_valid and len(rooted) <= 64
    assert rooted == result_uid("1.2.826.0.1.3680043.10.999", "1.2.3", 1, "m", "1", "sr")
    with pytest.raises(ValueError, match="uid_root"):
        result_uid("1.2.03", "1.2.3", 1, "m", "1", "sr")
    with pytest.raises(ValueError, match="uid_root"):
        ResultContext(manufacturer="pacsnode", software_version="0.1.0", uid_root="1.2.")


# --------------------------------------------------------------------------- every object, every kind


@pytest.mark.parametrize("kind", KINDS)
def test_objects_carry_air_equipment_and_the_source_patient_and_study(
    kind: str, outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    outcome, source = outcomes[kind], outcomes[kind].source_images[0]
    kinds = [k for k, _ in results[kind].all()]
    assert kinds == ([ResultKind.SEG, ResultKind.SR, ResultKind.SC, ResultKind.KO] if kind == "mr-brain"
                     else [ResultKind.SR, ResultKind.SC, ResultKind.KO])
    for result_kind, ds in results[kind].all():
        back = _reread(ds)
        for keyword in PATIENT_STUDY:
            assert back.get(keyword) == source.get(keyword), (result_kind, keyword)
        assert back.SeriesNumber == SERIES_NUMBERS[result_kind]
        assert back.SeriesDescription == f"AI RESULT {outcome.card.name} v{outcome.card.version}"
        assert back.Manufacturer == rs.CONTEXT.manufacturer
        assert list(back.SoftwareVersions) == [rs.CONTEXT.software_version, outcome.card.version]
        assert back.ContentDate == "20240812" and back.ContentTime.startswith("095949")
        assert back.InstanceCreationDate == "20240812"
        algorithms = [item for item in back.ContributingEquipmentSequence
                      if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM_CODE]
        assert len(algorithms) == 1, result_kind
        item = algorithms[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == ("99IHE", "Processing Algorithm")
        assert item.DeviceUID == outcome.card.device_uid
        assert item.Manufacturer == rs.CONTEXT.manufacturer
        assert item.ManufacturerModelName == outcome.card.name
        assert outcome.card.version in item.SoftwareVersions
        schemes = {s.CodingSchemeDesignator for s in back.CodingSchemeIdentificationSequence}
        assert "99IHE" in schemes


@pytest.mark.parametrize("kind", KINDS)
def test_every_object_passes_dciodvfy(kind: str, results: dict[str, ResultSet], tmp_path: Path) -> None:
    for result_kind, ds in results[kind].all():
        path = tmp_path / f"{result_kind.value}.dcm"
        path.write_bytes(rs.encode(ds))
        errors, warnings = rs.dciodvfy(path)
        assert errors == [], (result_kind, errors)
        unexpected = [w for w in warnings if not any(accepted in w for accepted in ACCEPTED_WARNINGS)]
        assert unexpected == [], (result_kind, unexpected)


@pytest.mark.parametrize("kind", KINDS)
def test_building_twice_gives_identical_bytes_and_no_clock_values(
    kind: str, outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    again = build_results(outcomes[kind], rs.CONTEXT)
    first = [rs.encode(ds) for _, ds in results[kind].all()]
    assert first == [rs.encode(ds) for _, ds in again.all()]
    # Every date is the source's or the outcome's: none comes from the clock of the build.
    source_dates = {str(e.value)[:8] for image in outcomes[kind].source_images for e in _walk(image)
                    if e.VR in ("DA", "DT") and e.value}
    for _, ds in again.all():
        for element in _walk(ds):
            if element.VR in ("DA", "DT") and element.value:
                assert str(element.value)[:8] in source_dates | {"20240812"}, element


# ---------------------------------------------------------------------------------------------- SR


@pytest.mark.parametrize("kind", KINDS)
def test_sr_reports_each_finding_with_probability_call_and_evidence(
    kind: str, outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    outcome = outcomes[kind]
    sr = hd.sr.srread(BytesIO(rs.encode(results[kind].sr)))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE", "PRELIMINARY")
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    (device,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == outcome.card.device_uid
    procedure = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    expected_procedure = {"cxr": "413815006", "ct-head": "303653007", "mr-brain": "25056-3"}[kind]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == expected_procedure
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(outcome.findings)
    for group, finding in zip(groups, outcome.findings, strict=True):
        assert group.finding_type is not None and group.finding_type.value == finding.concept.value
        assert group.finding_type.scheme_designator == finding.concept.scheme
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability)
        assert probability.unit.value == "1"
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value == (codes.SCT.Present if finding.present else codes.SCT.Absent)
        referenced = [image.referenced_sop_instance_uid for image in group.source_images]
        assert referenced == [image.SOPInstanceUID for image in finding.evidence]
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert {str(image.SOPInstanceUID) for image in outcome.source_images} <= evidence


def test_sr_measures_each_lesion_against_its_seg_segment(
    outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    outcome, made = outcomes["mr-brain"], results["mr-brain"]
    assert outcome.segmentation is not None and made.seg is not None
    sr = hd.sr.srread(BytesIO(rs.encode(made.sr)))
    seg = hd.seg.segread(BytesIO(rs.encode(made.seg)))
    lesions = _report(made.sr).get_volumetric_roi_measurement_groups()
    assert len(lesions) == len(outcome.segmentation.lesions) == 2
    for group, lesion in zip(lesions, outcome.segmentation.lesions, strict=True):
        assert group.tracking_identifier == f"Metastasis {lesion.number}"
        description = seg.get_segment_description(lesion.number)
        assert group.tracking_uid == description.tracking_uid
        reference = group.referenced_segment
        assert reference is not None
        segment_item = reference[0]
        assert segment_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert segment_item.ReferencedSOPSequence[0].ReferencedSegmentNumber == lesion.number
        sources = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in reference[1:]]
        assert sources == [outcome.segmentation.source_images[s].SOPInstanceUID for s in lesion.slices]
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion.volume_mm3) and volume.unit.value == "mm3"
        (peak,) = group.get_measurements(name=codes.DCM.Probability)
        assert peak.value == pytest.approx(lesion.max_probability)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value == codes.SCT.Present
    assert seg.SOPInstanceUID in {uid for _, _, uid, _ in sr.get_evidence()}


# --------------------------------------------------------------------------------------------- SEG


def _frames_by_slice(seg: Dataset, outcome: StudyOutcome) -> dict[tuple[int, int], np.ndarray]:
    """(segment, slice index) -> frame, from the SEG's own per-frame references."""
    assert outcome.segmentation is not None
    order = {str(image.SOPInstanceUID): k for k, image in enumerate(outcome.segmentation.source_images)}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    frames = {}
    for pixel, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames[(int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber), order[str(source)])] = pixel
    return frames


def test_seg_has_one_segment_per_lesion_and_a_frame_for_every_slice(
    outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    outcome, made = outcomes["mr-brain"], results["mr-brain"]
    assert outcome.segmentation is not None and made.seg is not None
    back = _reread(made.seg)
    assert back.SegmentationType == "BINARY"
    labels = [segment.SegmentLabel for segment in back.SegmentSequence]
    assert labels == ["Metastasis 1", "Metastasis 2"]
    for segment in back.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "128462008"
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == outcome.card.name
    slices = len(outcome.segmentation.source_images)
    assert int(back.NumberOfFrames) == slices * len(outcome.segmentation.lesions)
    frames = _frames_by_slice(back, outcome)
    assert len(frames) == slices * 2
    empty = 0
    for (number, k), frame in frames.items():
        np.testing.assert_array_equal(frame.astype(bool), outcome.segmentation.labels[k] == number)
        empty += int(not frame.any())
    assert empty > 0  # empty frames are kept, not omitted
    assert hd.seg.segread(BytesIO(rs.encode(made.seg))).number_of_segments == 2


def test_fractional_seg_keeps_each_lesions_probability(outcomes: dict[str, StudyOutcome], tmp_path: Path) -> None:
    outcome = outcomes["mr-brain"]
    assert outcome.segmentation is not None
    made = build_results(outcome, rs.CONTEXT, fractional_seg=True)
    assert made.seg is not None
    back = _reread(made.seg)
    assert (back.SegmentationType, back.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    scale = float(back.MaximumFractionalValue)
    for (number, k), frame in _frames_by_slice(back, outcome).items():
        inside = outcome.segmentation.labels[k] == number
        expected = np.where(inside, outcome.segmentation.probability[k], 0.0)
        np.testing.assert_allclose(frame / scale, expected, atol=1 / scale)
        assert not frame[~inside].any()
    assert made.sr.SOPInstanceUID == build_results(outcome, rs.CONTEXT).sr.SOPInstanceUID
    path = tmp_path / "seg.dcm"
    path.write_bytes(rs.encode(made.seg))
    assert rs.dciodvfy(path)[0] == []


def test_no_lesions_no_seg(phantoms: dict[str, rs.Phantom], tmp_path: Path) -> None:
    outcome = rs.make_outcome(phantoms["mr-brain"], with_lesions=False)
    made = build_results(outcome, rs.CONTEXT)
    assert made.seg is None
    assert [kind for kind, _ in made.all()] == [ResultKind.SR, ResultKind.SC, ResultKind.KO]
    assert _report(made.sr).get_volumetric_roi_measurement_groups() == []
    path = tmp_path / "sr.dcm"
    path.write_bytes(rs.encode(made.sr))
    assert rs.dciodvfy(path)[0] == []


# ------------------------------------------------------------------------------------------ KO, SC


@pytest.mark.parametrize("kind", KINDS)
def test_ko_flags_key_images_and_the_summary_with_the_findings(
    kind: str, outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    outcome, made = outcomes[kind], results[kind]
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(_reread(made.ko))
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in ko.ContentSequence
                  if item.ValueType in ("IMAGE", "COMPOSITE")]
    assert referenced == [*(image.SOPInstanceUID for image in outcome.key_images), made.sc.SOPInstanceUID]
    (note,) = [item.TextValue for item in ko.ContentSequence
               if item.ConceptNameCodeSequence[0].CodeValue == "113012"]  # Key Object Description
    assert "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW" in note
    for finding in outcome.findings:
        assert f"{finding.concept.meaning}: {'PRESENT' if finding.present else 'absent'}" in note
        assert f"probability {finding.probability:.3f}" in note
    device = [item for item in ko.ContentSequence if item.ValueType == "UIDREF"]
    assert device[0].UID == outcome.card.device_uid


@pytest.mark.parametrize("kind", KINDS)
def test_sc_is_an_8_bit_page_of_text(kind: str, results: dict[str, ResultSet]) -> None:
    back = _reread(results[kind].sc)
    assert (back.Modality, back.PhotometricInterpretation, back.BitsAllocated) == ("OT", "MONOCHROME2", 8)
    assert back.BurnedInAnnotation == "NO"
    pixels = back.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape[1] == 768
    lit = float((pixels > 128).mean())
    assert 0.005 < lit < 0.3  # text on a dark page, not blank and not a white block


# ------------------------------------------------------------------------------ not assessed

NOT_ASSESSED = "validation AUC 0.61 < gate 0.70"


def _without_call(outcome: StudyOutcome, index: int) -> StudyOutcome:
    """``outcome`` with finding ``index`` not assessed, as a worker reports a finding below its gate."""
    findings = list(outcome.findings)
    findings[index] = dataclasses.replace(findings[index], present=None, threshold=None,
                                          not_assessed_reason=NOT_ASSESSED)
    return dataclasses.replace(outcome, findings=tuple(findings))


def test_finding_below_its_gate_gets_no_call_in_any_object(outcomes: dict[str, StudyOutcome], tmp_path: Path) -> None:
    outcome = _without_call(outcomes["ct-head"], 1)
    made = build_results(outcome, rs.CONTEXT)
    report = _report(made.sr)  # through bytes and back
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(outcome.findings)
    for group, finding in zip(groups, outcome.findings, strict=True):
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability)
        parameters = [str(e.value) for e in _walk(group[0]) if e.keyword == "TextValue"]  # the algorithm's
        if finding.present is None:
            assert group.get_qualitative_evaluations() == []
            assert f"not assessed: {NOT_ASSESSED}" in parameters
            assert not any(p.startswith("threshold=") for p in parameters)
        else:
            (evaluation,) = group.get_qualitative_evaluations()
            assert evaluation.value == (codes.SCT.Present if finding.present else codes.SCT.Absent)
            assert f"threshold={finding.threshold:g}" in parameters
    path = tmp_path / "sr.dcm"
    path.write_bytes(rs.encode(made.sr))
    errors, warnings = rs.dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if not any(accepted in w for accepted in ACCEPTED_WARNINGS)] == []

    ko = _reread(made.ko)
    (note,) = [item.TextValue for item in ko.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    skipped = outcome.findings[1]
    assert f"{skipped.concept.meaning}: not assessed (probability {skipped.probability:.3f}, {NOT_ASSESSED})" in note
    lines = summary_lines(outcome)
    assert (skipped.name, f"{skipped.probability:.3f}", "-", "not assessed") in lines
    assert any(NOT_ASSESSED in " ".join(row) for row in lines)


@pytest.mark.parametrize(("change", "message"), [
    ({"present": None, "threshold": None, "not_assessed_reason": ""}, "not_assessed_reason must say why"),
    ({"present": None}, "threshold must be None"),
    ({"threshold": None}, r"outcome\.findings\[0\]\.threshold is None but the finding has a call"),
])
def test_a_call_and_its_threshold_go_together(change: dict[str, object], message: str,
                                              outcomes: dict[str, StudyOutcome]) -> None:
    with pytest.raises(ValueError, match=message):
        build_results(_finding_with(outcomes["cxr"], **change), rs.CONTEXT)


# ------------------------------------------------------------------------------------- versions


def test_new_study_version_gets_new_uids_and_supersedes_the_previous_sr(
    outcomes: dict[str, StudyOutcome], results: dict[str, ResultSet]
) -> None:
    first = results["mr-brain"]
    previous = _reread(first.sr)
    second = build_results(dataclasses.replace(outcomes["mr-brain"], version=2), rs.CONTEXT, previous=[previous])
    old = set().union(*(_uids(ds) for _, ds in first.all()))
    new = set().union(*(_uids(ds) for _, ds in second.all()))
    assert old.isdisjoint(new)
    back = _reread(second.sr)
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == previous.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == previous.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in _reread(first.sr)
    with pytest.raises(ValueError, match=r"previous\[0\] is the SR being built"):
        build_results(dataclasses.replace(outcomes["mr-brain"], version=1), rs.CONTEXT, previous=[previous])
    with pytest.raises(ValueError, match=r"previous\[0\] is not an SR"):
        build_results(outcomes["mr-brain"], rs.CONTEXT, previous=[_reread(first.sc)])


def test_new_model_version_gets_new_uids(phantoms: dict[str, rs.Phantom], results: dict[str, ResultSet]) -> None:
    retrained = build_results(rs.make_outcome(phantoms["ct-head"], model_version="1.1.0"), rs.CONTEXT)
    old = set().union(*(_uids(ds) for _, ds in results["ct-head"].all()))
    assert old.isdisjoint(set().union(*(_uids(ds) for _, ds in retrained.all())))


# ------------------------------------------------------------------------------------ bad input


def _finding_with(outcome: StudyOutcome, **changes: object) -> StudyOutcome:
    finding = dataclasses.replace(outcome.findings[0], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(outcome, findings=(finding, *outcome.findings[1:]))


@pytest.mark.parametrize(("change", "message"), [
    ({"probability": 1.3}, r"outcome\.findings\[0\]\.probability must be within \[0, 1\]"),
    ({"probability": float("nan")}, r"outcome\.findings\[0\]\.probability"),
    ({"threshold": -0.1}, r"outcome\.findings\[0\]\.threshold"),
])
def test_bad_finding_is_named(change: dict[str, object], message: str, outcomes: dict[str, StudyOutcome]) -> None:
    with pytest.raises(ValueError, match=message):
        build_results(_finding_with(outcomes["cxr"], **change), rs.CONTEXT)


def test_bad_segmentation_is_named(outcomes: dict[str, StudyOutcome]) -> None:
    outcome = outcomes["mr-brain"]
    segmentation = outcome.segmentation
    assert segmentation is not None
    short = dataclasses.replace(segmentation, labels=segmentation.labels[1:])
    with pytest.raises(ValueError, match=r"outcome\.segmentation\.labels must have shape .*\(8, 64, 64\)"):
        build_results(dataclasses.replace(outcome, segmentation=short), rs.CONTEXT)
    hot = dataclasses.replace(segmentation, probability=segmentation.probability * 2)
    with pytest.raises(ValueError, match=r"outcome\.segmentation\.probability must be .*within \[0, 1\]"):
        build_results(dataclasses.replace(outcome, segmentation=hot), rs.CONTEXT)
    one = dataclasses.replace(segmentation, lesions=segmentation.lesions[:1])
    with pytest.raises(ValueError, match=r"outcome\.segmentation\.labels must lie within 0\.\.1"):
        build_results(dataclasses.replace(outcome, segmentation=one), rs.CONTEXT)


def test_images_of_another_study_are_named(outcomes: dict[str, StudyOutcome]) -> None:
    outcome, stranger = outcomes["ct-head"], outcomes["cxr"].source_images[0]
    with pytest.raises(ValueError, match=r"outcome\.key_images\[0\] belongs to another study"):
        build_results(dataclasses.replace(outcome, key_images=(stranger,)), rs.CONTEXT)
    with pytest.raises(ValueError, match=r"outcome\.findings\[0\]\.evidence\[0\] belongs to another study"):
        build_results(_finding_with(outcome, evidence=(stranger,)), rs.CONTEXT)
    with pytest.raises(ValueError, match=r"outcome\.findings is empty"):
        build_results(dataclasses.replace(outcome, findings=()), rs.CONTEXT)
