"""A Secondary Capture page with the findings as text, for viewers that show only images.

Many PACS viewers ignore SR and SEG; a rendered page is what they can always show. It carries no
patient identifiers (those stay in the header), only the model, its findings and the warning
that the results are unreviewed. Rendered with Pillow (a highdicom dependency, so present on
every worker) and its bundled font, so the same outcome gives the same pixels on any host.
"""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from workers.outcome import StudyOutcome
from workers.results.clock import pin_clock, result_moment
from workers.results.context import ResultContext
from workers.results.equipment import (
    SC_SERIES_NUMBER,
    identity,
    stamp_software_versions,
)
from workers.results.seg import lesion_label
from workers.results.uids import RunUids

WARNING = "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW"
WIDTH = 768
LINE_HEIGHT = 26
MARGIN = 24
FONT_SIZE = 18
COLUMNS = (MARGIN, 300, 450, 600)  # x of: finding, probability, threshold, call
WRAP = 72  # characters of a full-width line: the bundled font's average lower-case glyph is 9 px wide
BACKGROUND = 0
TEXT = 255


def summary_lines(outcome: StudyOutcome) -> list[tuple[str, ...]]:
    """The page as rows of cells (one cell: a line of text; four: a table row)."""
    card = outcome.card
    rows: list[tuple[str, ...]] = [
        (f"AI RESULT: {card.name} v{card.version}",),
        (f"Task: {card.task}",),
        (WARNING,),
        ("",),
        ("Finding", "Probability", "Threshold", "Call"),
    ]
    for finding in outcome.findings:
        threshold = "-" if finding.threshold is None else f"{finding.threshold:.3f}"
        rows.append((finding.name, f"{finding.probability:.3f}", threshold, finding.call))
    # Why a finding gets no call is too long for the table's last column: wrapped lines below it.
    for finding in outcome.findings:
        if finding.present is None:
            text = f"{finding.name}: not assessed, {finding.not_assessed_reason}"
            rows.extend((line,) for line in textwrap.wrap(text, WRAP, subsequent_indent="  "))
    if outcome.segmentation is not None and outcome.segmentation.lesions:
        rows.append(("",))
        for lesion in outcome.segmentation.lesions:
            label = lesion_label(outcome, lesion.number)
            rows.append((f"{label}: {lesion.volume_mm3:.0f} mm3, max probability {lesion.max_probability:.3f}",))
    rows.extend([("",), (WARNING,)])
    return rows


def render_summary(outcome: StudyOutcome) -> np.ndarray:
    """The page as an 8-bit MONOCHROME2 array (white text on black, as radiology viewers expect)."""
    rows = summary_lines(outcome)
    height = 2 * MARGIN + LINE_HEIGHT * len(rows)
    page = Image.new("L", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, row in enumerate(rows):
        y = MARGIN + i * LINE_HEIGHT
        for x, cell in zip(COLUMNS, row, strict=False):
            draw.text((x, y), cell, fill=TEXT, font=font)
    return np.asarray(page, dtype=np.uint8)


def build_summary(outcome: StudyOutcome, context: ResultContext, uids: RunUids) -> hd.sc.SCImage:
    """The Secondary Capture page, in the study of the source images."""
    card = outcome.card
    when = result_moment(outcome.completed_at)
    reference = outcome.source_images[0]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=render_summary(outcome),
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # highdicom requires an orientation in the patient coordinate system; a text page has none,
        # so the value is emptied below (Patient Orientation is type 2C).
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **identity(context, card, uids, "sc", SC_SERIES_NUMBER, when, []),
    )
    sc["PatientOrientation"].value = None
    for keyword in ("BodyPartExamined", "Laterality"):
        # General Series wants Laterality for paired body parts: say which part the page is about.
        if keyword in reference:
            sc[keyword] = reference[keyword]
    sc.BurnedInAnnotation = "NO"
    stamp_software_versions(sc, context, card)
    sc.copy_patient_and_study_information(reference)
    pin_clock(sc, when)
    return sc
