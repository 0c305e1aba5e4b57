"""A Key Object Selection flagging the images a model's findings concern, for SR-blind viewers.

Titled "Of Interest" (DCM 113000): the selection is the model's, not a physician's hand-off, so
"For Referring Provider" would claim too much. The findings go in as the Key Object Description,
which viewers show beside the flagged images. The summary page is flagged too, so a study with no
finding (no key image) still gets a selection that tells the reader the model ran.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from workers.outcome import StudyOutcome
from workers.results.clock import pin_clock, result_moment
from workers.results.context import ResultContext
from workers.results.equipment import (
    KO_SERIES_NUMBER,
    device_observer,
    identity,
    stamp_software_versions,
)
from workers.results.summary import WARNING
from workers.results.uids import RunUids

TITLE = codes.DCM.OfInterest


def findings_note(outcome: StudyOutcome) -> str:
    """The findings as one line of text per finding, with the warning first."""
    card = outcome.card
    lines = [f"{card.name} v{card.version}: {WARNING}"]
    for finding in outcome.findings:
        basis = (f"threshold {finding.threshold:.3f}" if finding.threshold is not None
                 else finding.not_assessed_reason)
        lines.append(f"{finding.concept.meaning}: {finding.call} (probability {finding.probability:.3f}, {basis})")
    return "\n".join(lines)


def build_key_objects(
    outcome: StudyOutcome, context: ResultContext, uids: RunUids, *, summary: Dataset
) -> hd.ko.KeyObjectSelectionDocument:
    """The KO flagging ``outcome.key_images`` and the ``summary`` page, in that order."""
    card = outcome.card
    when = result_moment(outcome.completed_at)
    selected: dict[str, Dataset] = {}
    for image in (*outcome.key_images, summary):
        selected.setdefault(str(image.SOPInstanceUID), image)
    referenced = list(selected.values())
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=referenced,
        observer_device_context=device_observer(context, card),
        description=findings_note(outcome),
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **identity(context, card, uids, "ko", KO_SERIES_NUMBER, when, []),
    )
    stamp_software_versions(ko, context, card)
    ko.copy_patient_and_study_information(outcome.source_images[0])
    pin_clock(ko, when)
    return ko
