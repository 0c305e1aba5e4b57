"""What can be asked of the generator: the kinds of study, their findings, and the difficulty knobs.

Kept apart from the generators so the CLI can validate its arguments (and print the allowed
kinds) without importing numpy or highdicom.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Literal, cast, get_args

Kind = Literal["cxr", "ct-head", "mr-brain"]

KINDS: tuple[Kind, ...] = get_args(Kind)

# One 0/1 column per finding in labels.csv. "any" is the study-level "any abnormality" label of
# every kind; the other names are unique across kinds so that one CSV can hold all kinds.
CXR_FINDINGS: tuple[str, ...] = ("nodule", "consolidation", "effusion", "cardiomegaly")
CT_FINDINGS: tuple[str, ...] = (
    "epidural",
    "subdural",
    "subarachnoid",
    "intraparenchymal",
    "intraventricular",
)
MR_FINDINGS: tuple[str, ...] = ("metastasis",)

FINDINGS: Mapping[Kind, tuple[str, ...]] = MappingProxyType(
    {
        "cxr": CXR_FINDINGS,
        "ct-head": CT_FINDINGS,
        "mr-brain": MR_FINDINGS,
    }
)


def parse_kinds(text: str | list[str] | tuple[str, ...]) -> tuple[Kind, ...]:
    """Parse ``"cxr,ct-head"`` (or a sequence) into kinds, in the given order, without duplicates.

    Raises ``ValueError`` naming the allowed kinds for an unknown one, so callers (the CLI) can
    turn it into a usage error.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    kinds: list[Kind] = []
    for raw in parts:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in KINDS:
            raise ValueError(f"unknown kind {raw.strip()!r}; allowed kinds: {', '.join(KINDS)}")
        kind = cast(Kind, name)  # narrowed by the membership test above
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        raise ValueError(f"no kind given; allowed kinds: {', '.join(KINDS)}")
    return tuple(kinds)


@dataclass(frozen=True)
class Difficulty:
    """How hard the phantoms are for a model; every field is kind-neutral.

    Sizes are lesion diameters in mm (each kind maps them onto its own lesion shapes, e.g. the
    thickness of a subdural crescent or the height of an effusion). ``lesion_contrast`` and
    ``noise`` are multipliers of a realistic nominal value per modality (1.0 = typical clinical
    image), ``anatomy_variation`` scales the per-patient spread of anatomy (0 = every patient
    identical), and ``prevalence`` is the fraction of studies of each kind that carry findings.
    """

    lesion_size_mm: tuple[float, float] = (8.0, 30.0)
    lesion_contrast: float = 1.0
    lesion_count: tuple[int, int] = (1, 3)
    noise: float = 1.0
    anatomy_variation: float = 1.0
    prevalence: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.lesion_size_mm
        if not 0 < low <= high <= 200:
            raise ValueError("lesion_size_mm must be (min, max) with 0 < min <= max <= 200")
        low_n, high_n = self.lesion_count
        if not 1 <= low_n <= high_n <= 20:
            raise ValueError("lesion_count must be (min, max) with 1 <= min <= max <= 20")
        if not 0.1 <= self.lesion_contrast <= 5.0:
            raise ValueError("lesion_contrast must be within [0.1, 5]")
        if not 0.0 <= self.noise <= 10.0:
            raise ValueError("noise must be within [0, 10]")
        if not 0.0 <= self.anatomy_variation <= 3.0:
            raise ValueError("anatomy_variation must be within [0, 3]")
        if not 0.0 <= self.prevalence <= 1.0:
            raise ValueError("prevalence must be within [0, 1]")

    @classmethod
    def preset(cls, name: str) -> Difficulty:
        """A named preset: ``easy`` (big, bright lesions, little noise), ``standard`` or ``hard``."""
        presets = {
            "easy": cls(
                lesion_size_mm=(15.0, 40.0),
                lesion_contrast=1.6,
                lesion_count=(1, 3),
                noise=0.5,
                anatomy_variation=0.5,
            ),
            "standard": cls(),
            "hard": cls(
                lesion_size_mm=(4.0, 15.0),
                lesion_contrast=0.5,
                lesion_count=(1, 2),
                noise=1.6,
                anatomy_variation=1.5,
            ),
        }
        try:
            return presets[name]
        except KeyError:
            raise ValueError(f"unknown difficulty {name!r}; presets: {', '.join(presets)}") from None

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able form for the manifest."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }


DIFFICULTY_PRESETS: tuple[str, ...] = ("easy", "standard", "hard")
