"""Optional labels for prepared images, from a CSV keyed by study or SOP instance UID.

Labels ride along in the shards (``SampleRecord.labels``) so that a linear probe or a fine-tune
can use the same data without joining tables again. The synth generator's ``labels.csv`` is such
a file: one row per study, 0/1 columns per finding, blank where a finding does not apply.

A column is a label when every non-blank cell is a finite number, unless it names an identity or
bookkeeping value (``*_uid``, ``*_id``, ``*_date``, ``*_time``, ``*_path``, counts of instances,
instance numbers, age/sex): a date like 20240119 parses as a number but is no label.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

# Header names accepted for each key, most specific first.
SOP_KEYS = ("sop_uid", "SOPInstanceUID")
STUDY_KEYS = ("study_uid", "StudyInstanceUID")
NOT_LABELS = frozenset(
    {"patient_id", "patient_age", "patient_sex", "study_date", "n_instances", "instance_number", "kind", "modality"}
)
NOT_LABEL_SUFFIXES = ("uid", "_id", "_date", "_time", "_path")


def _number(text: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _find(header: list[str], names: tuple[str, ...]) -> str | None:
    folded = {name.casefold(): name for name in header}
    for name in names:
        if name.casefold() in folded:
            return folded[name.casefold()]
    return None


def _is_label_name(name: str) -> bool:
    lowered = name.strip().lower()
    return lowered not in NOT_LABELS and not lowered.endswith(NOT_LABEL_SUFFIXES)


@dataclass(frozen=True)
class LabelTable:
    """Numeric labels by UID; ``key`` says which UID (``sop_uid`` or ``study_uid``) the rows name."""

    key: str
    columns: tuple[str, ...]
    rows: dict[str, dict[str, float]]

    def lookup(self, *, sop_uid: str, study_uid: str) -> dict[str, float]:
        """The labels of an image (a copy; empty when the table does not list it)."""
        uid = sop_uid if self.key == "sop_uid" else study_uid
        return dict(self.rows.get(uid, {}))


def load_labels(path: Path) -> LabelTable:
    """Read a labels CSV. Keyed by SOP instance UID when it has such a column, else by study UID.

    Blank cells are left out of an image's labels. A UID listed twice keeps its last row.
    Raises ``ValueError`` when the file names neither key.
    """
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        sop_column = _find(header, SOP_KEYS)
        study_column = _find(header, STUDY_KEYS)
        key_column = sop_column or study_column
        if key_column is None:
            raise ValueError(
                f"{path}: no key column; expected one of {', '.join(SOP_KEYS + STUDY_KEYS)} in the header"
            )
        candidates = [name for name in header if name not in (sop_column, study_column) and _is_label_name(name)]
        numbers: set[str] = set()
        not_numbers: set[str] = set()
        raw: dict[str, dict[str, str]] = {}
        for row in reader:
            uid = (row.get(key_column) or "").strip()
            if not uid:
                continue
            cells = {name: (row.get(name) or "").strip() for name in candidates}
            for name, text in cells.items():
                if text:
                    (numbers if _number(text) is not None else not_numbers).add(name)
            raw[uid] = cells
    columns = tuple(name for name in candidates if name in numbers and name not in not_numbers)
    rows = {
        uid: {name: value for name in columns if (value := _number(cells[name])) is not None}
        for uid, cells in raw.items()
    }
    return LabelTable(key="sop_uid" if sop_column else "study_uid", columns=columns, rows=rows)
