"""The clinical tasks: what each model predicts, on which studies, and with which coded concepts.

Codes go into the model card and from there into the TID 1500 SR the workers write. SNOMED CT codes
are those of DICOM's own code tables (pydicom's ``codes.SCT``). Findings without a code there carry
a code of our private scheme ``99PACSNODE`` (a DICOM "99"-prefixed local scheme), so that no
concept is mislabelled; sites that need SNOMED CT for them can map the private codes in the card.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from models.preprocess import InputSpec

PRIVATE_SCHEME = "99PACSNODE"
TaskName = Literal["cxr-abnormality", "ct-hemorrhage", "mr-metastasis"]
TaskKind = Literal["classification", "slice-classification", "segmentation"]

# The channel convention of the one encoder all tasks share: head CT as the brain, subdural and bone
# windows radiologists read it in (acute blood is 50-90 HU against 20-45 HU for brain: under a
# soft-tissue window it spans a tenth of the grey range, under the brain window most of it); every
# other image replicated over the three channels.
HEAD_CT_WINDOWS = ("brain", "subdural", "bone")
SHARED_CHANNELS = len(HEAD_CT_WINDOWS)
CT_NEIGHBOURS = 0
CT_SIZE = 128
CXR_SIZE = 128
MR_SIZE = 128


class CodedConcept(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    scheme: str
    meaning: str


class FindingSpec(BaseModel):
    """One model output: the label column it learns from and the concept it reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    concept: CodedConcept


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: TaskName
    kind: TaskKind
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    findings: tuple[FindingSpec, ...]
    description: str
    input: InputSpec
    """The declared network input (resolution, channels and what each is): finetuning, evaluation and
    inference use it unless a recipe gives another, and the card records the one used."""

    @property
    def outputs(self) -> list[str]:
        return [finding.name for finding in self.findings]


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme="SCT", meaning=meaning)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme=PRIVATE_SCHEME, meaning=meaning)


def task_specs() -> dict[str, TaskSpec]:
    """The three tasks of the paper's evaluation, keyed by name."""
    cxr = TaskSpec(
        name="cxr-abnormality", kind="classification", modalities=("CR", "DX"), body_parts=("CHEST",),
        description="Chest radiograph abnormalities, one probability per finding plus any abnormality",
        input=InputSpec(size=CXR_SIZE, channels=SHARED_CHANNELS),
        findings=(
            FindingSpec(name="any", concept=_sct("263654008", "Abnormal")),
            FindingSpec(name="nodule", concept=_sct("27925004", "Nodule")),
            FindingSpec(name="consolidation", concept=_private("CONSOLIDATION", "Lung consolidation")),
            FindingSpec(name="effusion", concept=_sct("60046008", "Pleural effusion")),
            FindingSpec(name="cardiomegaly", concept=_sct("287272002", "Cardiomegaly")),
        ),
    )
    ct = TaskSpec(
        name="ct-hemorrhage", kind="slice-classification", modalities=("CT",), body_parts=("HEAD", "BRAIN"),
        description="Head CT hemorrhage per slice, aggregated to the study (maximum over slices)",
        input=InputSpec.ct(CT_SIZE, list(HEAD_CT_WINDOWS), neighbours=CT_NEIGHBOURS),
        findings=(
            FindingSpec(name="any", concept=_sct("1386000", "Intracranial hemorrhage")),
            FindingSpec(name="epidural", concept=_private("EDH", "Epidural hemorrhage")),
            FindingSpec(name="subdural", concept=_private("SDH", "Subdural hemorrhage")),
            FindingSpec(name="subarachnoid", concept=_private("SAH", "Subarachnoid hemorrhage")),
            FindingSpec(name="intraparenchymal", concept=_private("IPH", "Intraparenchymal hemorrhage")),
            FindingSpec(name="intraventricular", concept=_private("IVH", "Intraventricular hemorrhage")),
        ),
    )
    mr = TaskSpec(
        name="mr-metastasis", kind="segmentation", modalities=("MR",), body_parts=("HEAD", "BRAIN"),
        description="Brain MR metastases: a 3D mask from per-slice segmentation, split into lesions with volumes",
        input=InputSpec(size=MR_SIZE, channels=SHARED_CHANNELS),
        findings=(FindingSpec(name="metastasis", concept=_sct("128462008", "Metastasis")),),
    )
    return {spec.name: spec for spec in (cxr, ct, mr)}


def task_spec(name: str) -> TaskSpec:
    specs = task_specs()
    if name not in specs:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(specs)}")
    return specs[name]
