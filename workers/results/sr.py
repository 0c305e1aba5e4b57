"""The findings as a Comprehensive 3D SR with a TID 1500 Measurement Report at its root (IHE AIR).

One measurement group per finding (TID 1501): its concept as the finding, "present"/"absent" as a
qualitative evaluation (none for a finding the model card does not assess), the calibrated
probability as a unitless measurement and the images that drive it as source images. With a SEG, one volumetric group per lesion (TID 1411) references its segment and
reports its volume and highest probability. The observer is the model as a DEVICE (its Device UID
changes with every retraining) and the report stays UNVERIFIED and PRELIMINARY: a radiologist has
not confirmed it. It is COMPLETE: a later run never adds to it, a new version supersedes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from workers.outcome import FindingOutcome, LesionOutcome, SegmentationOutcome, StudyOutcome
from workers.results.clock import pin_clock, result_moment
from workers.results.concepts import (
    ABSENT,
    CUBIC_MILLIMETER,
    MAXIMUM,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    VOLUME,
    coded,
    procedure_reported,
)
from workers.results.context import ResultContext
from workers.results.equipment import (
    SR_SERIES_NUMBER,
    device_observer,
    identity,
    stamp_software_versions,
)
from workers.results.seg import lesion_label, lesion_tracking_uid
from workers.results.uids import RunUids

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _algorithm(outcome: StudyOutcome, parameter: str) -> hd.sr.AlgorithmIdentification:
    """The model, with the parameter its call was made at (the operating threshold), or why it made none."""
    return hd.sr.AlgorithmIdentification(name=outcome.card.name, version=outcome.card.version, parameters=[parameter])


def _call(finding: FindingOutcome) -> tuple[str, list[hd.sr.QualitativeEvaluation]]:
    """The algorithm parameter and the present/absent evaluation of ``finding``.

    A finding the card does not assess keeps its measurement group, with the probability and the
    evidence but without a qualitative evaluation: omitting the group would make "the model makes
    no call here" look like "the model does not know this finding", and the reason (the algorithm
    parameter "not assessed: ...") would have nowhere to go. TID 1501 makes the qualitative
    evaluations optional, so the document stays valid.
    """
    if finding.present is None or finding.threshold is None:
        return f"not assessed: {finding.not_assessed_reason}", []
    value = PRESENT if finding.present else ABSENT
    return f"threshold={finding.threshold:g}", [hd.sr.QualitativeEvaluation(name=coded(finding.concept), value=value)]


def _finding_group(
    outcome: StudyOutcome, uids: RunUids, index: int, finding: FindingOutcome
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = coded(finding.concept)
    sources = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
        )
        for image in finding.evidence
    ]
    parameter, evaluations = _call(finding)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.uid(f"finding-{index}-{finding.name}"), identifier=finding.name
        ),
        finding_type=concept,
        algorithm_id=_algorithm(outcome, parameter),
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=NO_UNITS)],
        qualitative_evaluations=evaluations or None,
        source_images=sources or None,
    )


def _lesion_group(
    outcome: StudyOutcome, segmentation: SegmentationOutcome, uids: RunUids, seg: Dataset, lesion: LesionOutcome
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    concept = coded(outcome.card.outputs[0].concept)
    # The segment is referenced by number with the slices the lesion touches as its sources; frame
    # numbers would exclude the segment number (PS3.3 C.18.3.1), which highdicom still writes.
    touched = [segmentation.source_images[s] for s in lesion.slices] or list(segmentation.source_images)
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=lesion.number,
        source_images=[
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
            )
            for image in touched
        ],
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=lesion_tracking_uid(uids, lesion.number), identifier=lesion_label(outcome, lesion.number)
        ),
        referenced_segment=segment,
        finding_type=concept,
        algorithm_id=_algorithm(outcome, f"threshold={segmentation.threshold:g}"),
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=float(lesion.volume_mm3), unit=CUBIC_MILLIMETER),
            hd.sr.Measurement(
                name=PROBABILITY, value=float(lesion.max_probability), unit=NO_UNITS, derivation=MAXIMUM
            ),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=PRESENT)],
    )


def _evidence(outcome: StudyOutcome, seg: Dataset | None) -> list[Dataset]:
    """Every instance the SR references or was made from, once each, in a fixed order."""
    groups: list[Iterable[Dataset]] = [outcome.source_images]
    groups.extend(finding.evidence for finding in outcome.findings)
    if outcome.segmentation is not None:
        groups.append(outcome.segmentation.source_images)
    if seg is not None:
        groups.append([seg])
    unique: dict[str, Dataset] = {}
    for group in groups:
        for image in group:
            unique.setdefault(str(image.SOPInstanceUID), image)
    return list(unique.values())


def check_previous(previous: Sequence[Dataset], study_uid: str, sop_uid: str) -> None:
    """Predecessors must be other SR documents of this study."""
    for i, document in enumerate(previous):
        if not str(document.get("SOPClassUID", "")).startswith(SR_STORAGE_PREFIX):
            raise ValueError(f"previous[{i}] is not an SR document")
        if str(document.get("StudyInstanceUID", "")) != study_uid:
            raise ValueError(f"previous[{i}] belongs to another study than outcome.study_uid")
        if "SeriesInstanceUID" not in document or "SOPInstanceUID" not in document:
            raise ValueError(f"previous[{i}] lacks its SeriesInstanceUID or SOPInstanceUID")
        if str(document.SOPInstanceUID) == sop_uid:
            raise ValueError(f"previous[{i}] is the SR being built (same study version and model version)")


def build_sr(
    outcome: StudyOutcome,
    context: ResultContext,
    uids: RunUids,
    *,
    seg: Dataset | None = None,
    previous: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 SR of ``outcome``; ``previous`` (SRs of earlier study versions) it supersedes."""
    sop_uid = uids.uid("sr")
    check_previous(previous, outcome.study_uid, sop_uid)
    card = outcome.card
    when = result_moment(outcome.completed_at)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [_finding_group(outcome, uids, i, finding) for i, finding in enumerate(outcome.findings)]
    if seg is not None and outcome.segmentation is not None:
        groups.extend(
            _lesion_group(outcome, outcome.segmentation, uids, seg, lesion)
            for lesion in outcome.segmentation.lesions
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(context, card)),
        procedure_reported=procedure_reported(outcome.source_images[0]),
        imaging_measurements=groups,
    )
    schemes = [finding.concept.scheme for finding in outcome.findings]
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(outcome, seg),
        content=report,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous) or None,
        **identity(context, card, uids, "sr", SR_SERIES_NUMBER, when, schemes),
    )
    stamp_software_versions(sr, context, card)
    pin_clock(sr, when)
    return sr
