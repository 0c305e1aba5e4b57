"""What a DONE report tells the node beyond the findings, for the radiologist's study page: which
model made the results and how it did on validation, and the key image of each finding with the
window the model read it in.

The node keeps no model registry of its own (the models live on the worker hosts), so the card's
figures travel with each report; they are the card's, not recomputed.
"""

from __future__ import annotations

from models.card import ModelCard
from node.messages import DisplayWindow, KeyImage, ModelSummary, OutputSummary
from node.worklist import as_number
from workers.outcome import StudyOutcome


def model_summary(card: ModelCard) -> ModelSummary:
    """The card's version, headline validation metric against its gate, and per-output figures."""
    return ModelSummary(
        name=card.name, version=card.version, metric=str(card.validation.get("metric", "")),
        value=as_number(card.validation.get("value")), gate=as_number(card.validation.get("gate")),
        deployability=card.deployability,
        outputs=[OutputSummary(name=o.name, assessed=o.assessed, threshold=o.operating_threshold,
                               validation_auc=o.validation_auc, positives=o.positives, negatives=o.negatives,
                               ece_before=o.calibration.ece_before, ece_after=o.calibration.ece_after)
                 for o in card.outputs])


def key_images(outcome: StudyOutcome) -> list[KeyImage]:
    """One entry per distinct key slice, naming the findings it drives, in finding order. A CT slice
    is shown in the window of the model's first input channel (brain for head CT); other images in
    the robust-percentile mapping every other input uses (``window`` None)."""
    modality = {str(ds.SOPInstanceUID): str(ds.get("Modality", "")) for ds in outcome.source_images}
    window = DisplayWindow.model_validate(outcome.card.input.ct_windows()[0].model_dump())
    by_slice: dict[tuple[str, int], list[str]] = {}
    for finding in outcome.findings:
        if finding.key_slice is not None:
            by_slice.setdefault(finding.key_slice, []).append(finding.name)
    return [KeyImage(sop_uid=sop_uid, frame=frame, findings=names,
                     window=window if modality.get(sop_uid) == "CT" else None)
            for (sop_uid, frame), names in by_slice.items()]
