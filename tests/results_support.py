"""Helpers of the result-object tests: phantom studies, hand-made model cards and outcomes, dciodvfy.

Outcomes are built from real phantom DICOM (``node.synth``) read header-only, with probabilities
derived from the phantom's ground truth, so the encoders meet the headers the node really stores.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from models.card import AppliesTo, ModelCard, OutputSpec
from models.preprocess import InputSpec
from models.tasks import task_spec
from node.synth import Difficulty, Manifest, StudyRecord, generate
from pretrain.backbones import EncoderSpec
from workers.outcome import FindingOutcome, LesionOutcome, SegmentationOutcome, StudyOutcome
from workers.results import ResultContext

SEED = 11
SMALL = {"ct_slices": 6, "mr_slices": 8, "ct_size": 64, "mr_size": 64, "cxr_size": 64}
COMPLETED_AT = 1_723_456_789.25  # 2024-08-12 09:59:49.25 UTC
CONTEXT = ResultContext(manufacturer="pacsnode", software_version="0.1.0", uid_root="2.25",
                        institution_name="Phantom General Hospital")
DEVICE_UID = "2.25.301234567890123456789012345678901234567"
TASK_OF_KIND = {"cxr": "cxr-abnormality", "ct-head": "ct-hemorrhage", "mr-brain": "mr-metastasis"}
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def make_phantoms(out: Path) -> Manifest:
    """One positive study of each kind, small enough for a fast test."""
    difficulty = Difficulty(prevalence=1.0, lesion_count=(2, 2), lesion_size_mm=(25.0, 40.0))
    return generate(out, 1, ["cxr", "ct-head", "mr-brain"], SEED, difficulty, **SMALL)  # type: ignore[arg-type]


def make_card(task: str, *, version: str = "1.0.0", device_uid: str = DEVICE_UID) -> ModelCard:
    """A model card as finetuning writes it, with the task's outputs at threshold 0.5."""
    spec = task_spec(task)
    return ModelCard(
        name=task,
        version=version,
        task=spec.name,
        kind=spec.kind,
        description=spec.description,
        applies_to=AppliesTo(modalities=spec.modalities, body_parts=spec.body_parts),
        encoder=EncoderSpec(),
        input=InputSpec(size=64),
        outputs=[OutputSpec(name=f.name, concept=f.concept, threshold=0.5, threshold_rule="fixed 0.5 (test card)",
                            assessed=True) for f in spec.findings],
        deployable=True,
        deployability="test card",
        device_uid=device_uid,
        created="2024-08-01T00:00:00Z",
    )


@dataclass(frozen=True)
class Phantom:
    """One phantom study: its record, header-only images and (when it has one) the ground-truth SEG."""

    record: StudyRecord
    images: tuple[Dataset, ...]
    truth: Dataset | None


def load(manifest: Manifest, kind: str) -> Phantom:
    record = next(study for study in manifest.studies if study.kind == kind)
    images = tuple(
        pydicom.dcmread(manifest.out_dir / path, stop_before_pixels=True) for path in record.instances
    )
    truth = pydicom.dcmread(manifest.out_dir / record.seg_path) if record.seg_path else None
    return Phantom(record, images, truth)


def _probability(label: int, name: str) -> float:
    """A confident model: high where the phantom has the finding, low elsewhere, distinct per name."""
    offset = (sum(map(ord, name)) % 7) / 100
    return round(0.86 + offset, 4) if label else round(0.08 + offset, 4)


def finding_outcomes(phantom: Phantom, task: str, evidence: tuple[Dataset, ...]) -> tuple[FindingOutcome, ...]:
    findings = []
    for finding in task_spec(task).findings:
        probability = _probability(phantom.record.labels.get(finding.name, 0), finding.name)
        findings.append(
            FindingOutcome(
                name=finding.name, concept=finding.concept, probability=probability, threshold=0.5,
                present=probability >= 0.5, evidence=evidence if probability >= 0.5 else evidence[:1],
            )
        )
    return tuple(findings)


def truth_mask(phantom: Phantom) -> np.ndarray:
    """The union of the ground-truth segments on the source grid (slices, rows, columns)."""
    assert phantom.truth is not None
    order = {str(image.SOPInstanceUID): k for k, image in enumerate(phantom.images)}
    frames = phantom.truth.pixel_array.reshape(-1, phantom.truth.Rows, phantom.truth.Columns)
    mask = np.zeros((len(phantom.images), phantom.truth.Rows, phantom.truth.Columns), dtype=bool)
    for frame, item in zip(frames, phantom.truth.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[order[str(source)]] |= frame.astype(bool)
    return mask


def segmentation_outcome(phantom: Phantom, mask: np.ndarray) -> SegmentationOutcome:
    """Lesions as connected components of ``mask``, probabilities graded inside them."""
    labels, count = ndimage.label(mask)
    labels = labels.astype(np.int32)
    probability = np.where(mask, 0.7, 0.02).astype(np.float32)
    probability[labels == 1] = 0.93
    spacing = [float(v) for v in phantom.images[0].PixelSpacing]
    voxel = spacing[0] * spacing[1] * float(phantom.images[0].SpacingBetweenSlices)
    lesions = []
    for number in range(1, count + 1):
        inside = labels == number
        lesions.append(
            LesionOutcome(
                number=number, voxels=int(inside.sum()), volume_mm3=float(inside.sum() * voxel),
                max_probability=float(probability[inside].max()),
                slices=tuple(int(k) for k in np.flatnonzero(inside.any(axis=(1, 2)))),
            )
        )
    return SegmentationOutcome(
        source_images=phantom.images, probability=probability, threshold=0.5, labels=labels,
        lesions=tuple(lesions),
    )


def make_outcome(
    phantom: Phantom, *, version: int = 1, model_version: str = "1.0.0", with_lesions: bool = True
) -> StudyOutcome:
    """The outcome a worker would produce for ``phantom`` with its kind's task."""
    task = TASK_OF_KIND[phantom.record.kind]
    card = make_card(task, version=model_version)
    evidence = phantom.images[len(phantom.images) // 2 : len(phantom.images) // 2 + 2]
    findings = finding_outcomes(phantom, task, evidence)
    segmentation = None
    if card.kind == "segmentation":
        mask = truth_mask(phantom) if with_lesions else np.zeros((len(phantom.images), 64, 64), dtype=bool)
        segmentation = segmentation_outcome(phantom, mask)
    key_images = evidence if any(f.present for f in findings) else ()
    return StudyOutcome(
        study_uid=phantom.record.study_uid, version=version, completed_at=COMPLETED_AT, card=card,
        source_images=phantom.images, findings=findings, key_images=key_images, segmentation=segmentation,
    )


def encode(ds: Dataset) -> bytes:
    """The object as a DICOM file (preamble, file meta, dataset), as the worker stores it."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's errors and warnings for the file at ``path``."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    assert errors or run.returncode == 0, f"dciodvfy exited {run.returncode} without an Error line: {lines}"
    return errors, warnings
