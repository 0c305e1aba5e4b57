"""Deterministic phantom DICOM studies with ground truth, for tests, demos and benchmarks.

Three kinds, each with "with or without findings" studies and labels true by construction:

* ``cxr``: PA chest radiograph (DX For Presentation), findings nodule, consolidation, effusion,
  cardiomegaly;
* ``ct-head``: axial head CT (HU calibrated), haemorrhage subtypes epidural, subdural,
  subarachnoid, intraparenchymal, intraventricular, labelled per study and per slice;
* ``mr-brain``: axial post-contrast T1 MR, enhancing metastases with count and volume.

Lesion masks are written as DICOM SEG (highdicom). ``generate`` is the entry point; the
``pacsnode synth`` command wraps it. Nothing here imports torch.
"""

from node.synth.generate import Geometry, default_workers, generate
from node.synth.manifest import Manifest, SliceLabels, StudyRecord
from node.synth.spec import DIFFICULTY_PRESETS, FINDINGS, KINDS, Difficulty, Kind, parse_kinds

__all__ = [
    "DIFFICULTY_PRESETS",
    "FINDINGS",
    "KINDS",
    "Difficulty",
    "Geometry",
    "Kind",
    "Manifest",
    "SliceLabels",
    "StudyRecord",
    "default_workers",
    "generate",
    "parse_kinds",
]
