"""Labelled studies for finetuning: which images, in which order, with which labels and masks.

``collect_studies`` indexes a folder of DICOM files with the pretraining indexer (so the same
files count as images, in the same slice order), picks one series per study and joins a study
labels CSV, optional per-slice labels, and optional SEG ground truth. ``patient_split`` and
``subsample`` make the deterministic, patient-level splits and label-fraction subsets the
experiments need.

Privacy: a study carries ``patient_key``, a SHA-256 prefix of its PatientID, never the ID itself;
the key is what a patient-level split needs. Logs and errors name UIDs and counts only.

Unlabelled studies. Studies in the data that have a series of the wanted modality but no label
row are left out; how many is in the returned list's ``summary`` (:class:`CollectSummary`) and
logged as a warning. Label rows for studies that are not in the data at all are an error: that is
a wrong folder or a wrong labels file, not something to train around.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pretrain.index import ImageRow, build_index, open_index
from pretrain.labels import SOP_KEYS, STUDY_KEYS, load_labels

__all__ = [
    "SPLITS",
    "CollectSummary",
    "SliceRef",
    "StudyItem",
    "StudyList",
    "collect_studies",
    "patient_split",
    "read_seg_masks",
    "subsample",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PATIENT_KEY_HEX = 16  # 64 bits of SHA-256: collisions are negligible, reversal is a dictionary attack away
# Per-slice columns that describe where a slice is, not what it shows: never labels.
SLICE_GEOMETRY_COLUMNS = frozenset({"z_mm", "slice_position", "slice_location", "position_mm"})
EXAMPLES = 5  # UIDs an error message lists


@dataclass(frozen=True)
class SliceRef:
    """One frame of the chosen series: file, 0-based frame, its SOP UID and slice position (mm)."""

    path: Path
    frame: int
    sop_uid: str
    position: float | None


@dataclass
class StudyItem:
    """One labelled study: the series a model reads from it, its labels and where its masks are."""

    study_uid: str
    patient_key: str
    modality: str
    series_uid: str
    slices: list[SliceRef]
    labels: dict[str, float]
    slice_labels: dict[str, dict[str, float]]
    seg_path: Path | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None


@dataclass(frozen=True)
class CollectSummary:
    """What ``collect_studies`` left out, by reason (counts of studies or label rows)."""

    studies: int  # collected
    unlabelled: int  # studies with a series of the modality but no label row: left out
    other_modality: int  # labelled studies in the data without a usable series of the modality
    skipped_frames: int  # localizer / derived / secondary frames of the modality not considered
    slice_labels_unused: int  # slice label rows for images in the data but not in a chosen series


class StudyList(list[StudyItem]):
    """A plain list of studies that also carries the :class:`CollectSummary` of its collection."""

    summary: CollectSummary

    def __init__(self, items: Iterable[StudyItem], summary: CollectSummary) -> None:
        super().__init__(items)
        self.summary = summary


def patient_key(patient_id: str) -> str:
    """The split key of a patient: a SHA-256 prefix, so the raw ID never leaves the header read."""
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:PATIENT_KEY_HEX]


def _modalities(modality: str | Sequence[str]) -> frozenset[str]:
    names = [modality] if isinstance(modality, str) else list(modality)
    chosen = frozenset(name.strip().upper() for name in names if name.strip())
    if not chosen:
        raise ValueError("modality must name at least one modality (e.g. 'CT' or ('CR', 'DX'))")
    return chosen


def is_primary_image(image_type: str) -> bool:
    """Whether an image (ImageType, backslash-joined) is a primary acquisition: not a localizer, not
    derived or secondary.

    A localizer (scout) often has more frames than anything but is no diagnostic slice; derived
    and secondary images (MPRs, MIPs, screenshots) repeat the acquisition in another geometry.
    An empty ImageType says nothing, so the image is kept. Finetuning and inference share this rule.
    """
    values = [value.strip().upper() for value in image_type.split("\\")]
    if "LOCALIZER" in values:
        return False
    if values and values[0] == "DERIVED":
        return False
    return not (len(values) > 1 and values[1] == "SECONDARY")


def _slice_spacing(rows: Sequence[ImageRow]) -> float | None:
    """Median distance between consecutive slice positions; ``None`` without two known positions."""
    positions = [row.slice_position for row in rows]
    if len(positions) < 2 or any(position is None for position in positions):
        return None
    known = [float(position) for position in positions if position is not None]
    steps = [abs(b - a) for a, b in itertools.pairwise(known)]
    spacing = statistics.median(steps)
    return spacing if spacing > 0 else None


def _read_patient_key(path: Path, study_uid: str) -> str:
    """The patient key of one study, from one header (the ID is hashed and dropped right here).

    A study without PatientID gets a key of its own (derived from its study UID): it cannot be
    matched to other studies, which is the best that can be done, and it is logged.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except (InvalidDicomError, OSError) as exc:
        raise ValueError(
            f"study {study_uid}: cannot read a header for its PatientID ({type(exc).__name__})"
        ) from exc
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        log.warning("study %s has no patient identifier: it counts as its own patient in splits", study_uid)
        return patient_key("study:" + study_uid)
    return patient_key(patient_id)


@dataclass(frozen=True)
class _StudyLabels:
    rows: dict[str, dict[str, float]]
    seg_paths: dict[str, Path]


def _read_study_labels(path: Path) -> _StudyLabels:
    """Numeric labels by study UID (as :func:`pretrain.labels.load_labels` reads them) and seg paths."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        folded = {name.casefold(): name for name in header}
        study_column = next((folded[key.casefold()] for key in STUDY_KEYS if key.casefold() in folded), None)
        if study_column is None:
            raise ValueError(
                f"{path.name}: no study UID column (expected one of {', '.join(STUDY_KEYS)}); "
                f"its header is {header}"
            )
        if any(key.casefold() in folded for key in SOP_KEYS):
            raise ValueError(
                f"{path.name}: has a SOP instance UID column, so it is keyed per image; study labels "
                "are one row per study (per-slice labels go to slice_labels)"
            )
        seg_column = folded.get("seg_path")
        seg_paths: dict[str, Path] = {}
        for row in reader:
            uid = (row.get(study_column) or "").strip()
            text = (row.get(seg_column) or "").strip() if seg_column else ""
            if uid and text:
                seg = Path(text)
                seg_paths[uid] = seg if seg.is_absolute() else path.parent / seg
    table = load_labels(path)
    return _StudyLabels(rows=table.rows, seg_paths=seg_paths)


def _read_slice_labels(path: Path) -> dict[str, dict[str, float]]:
    """Numeric per-slice labels by SOP instance UID, without position columns such as ``z_mm``."""
    table = load_labels(Path(path))
    if table.key != "sop_uid":
        raise ValueError(
            f"{Path(path).name}: slice labels need a SOP instance UID column ({', '.join(SOP_KEYS)})"
        )
    return {
        uid: {name: value for name, value in labels.items() if name.lower() not in SLICE_GEOMETRY_COLUMNS}
        for uid, labels in table.rows.items()
    }


def _first(uids: Iterable[str]) -> str:
    listed = sorted(uids)
    more = f" (and {len(listed) - EXAMPLES} more)" if len(listed) > EXAMPLES else ""
    return ", ".join(listed[:EXAMPLES]) + more


@dataclass
class _Scan:
    """What the index holds, reduced to what collection needs."""

    studies: set[str] = field(default_factory=set)  # every study UID with an image
    sops: set[str] = field(default_factory=set)  # every SOP UID with an image
    modalities: set[str] = field(default_factory=set)
    best: dict[str, list[ImageRow]] = field(default_factory=dict)  # study -> chosen series' frames
    skipped_frames: int = 0


def _scan(index_path: Path, root: Path, wanted: frozenset[str]) -> _Scan:
    """Studies under ``root`` only: a kept index file may also hold other folders' files."""
    scan = _Scan()
    prefix = str(root.resolve()).rstrip(os.sep) + os.sep
    with open_index(index_path) as index:
        for all_rows in index.iter_series():
            series = [row for row in all_rows if row.path.startswith(prefix)]
            if not series:
                continue
            first = series[0]
            scan.studies.add(first.study_uid)
            scan.sops.update(row.sop_uid for row in series)
            scan.modalities.update(row.modality for row in series)
            rows = [row for row in series if row.modality in wanted]
            usable = [row for row in rows if is_primary_image(row.image_type)]
            scan.skipped_frames += len(rows) - len(usable)
            if not usable:
                continue
            current = scan.best.get(first.study_uid)
            # Most frames wins; ties go to the smaller series UID (iter_series comes sorted by it).
            if current is None or len(usable) > len(current):
                scan.best[first.study_uid] = usable
    return scan


def collect_studies(
    data: Path,
    labels: Path,
    *,
    modality: str | Sequence[str],
    slice_labels: Path | None = None,
    index_path: Path | None = None,
    workers: int | None = None,
) -> StudyList:
    """The labelled studies under ``data`` with a series of ``modality``, sorted by study UID.

    ``data`` is indexed recursively with :func:`pretrain.index.build_index` into ``index_path``
    (kept, and reused incrementally next time; only its files under ``data`` are used) or a
    temporary file; ``workers`` is passed on (``None``: one per CPU). Per study, the series of
    the modality with the most primary frames is chosen (localizer, derived and secondary frames
    are not counted, see ``_usable``), its frames in the index's order (slice position, then
    instance number).

    ``labels`` is a CSV with a ``study_uid`` (or ``StudyInstanceUID``) column; its numeric columns
    are the labels (:func:`pretrain.labels.load_labels`), an optional ``seg_path`` column names
    the study's SEG relative to the CSV's folder. ``slice_labels`` is a CSV keyed by ``sop_uid``
    (or ``SOPInstanceUID``); position columns like ``z_mm`` are dropped.

    Raises ``ValueError`` for a labels file without a study UID column, label rows (study or
    slice) naming studies or images that are not in the data, a SEG path that does not exist, or
    no labelled study of the modality. Returns a :class:`StudyList` whose ``summary`` counts what
    was left out.
    """
    wanted = _modalities(modality)
    study_labels = _read_study_labels(Path(labels))
    per_slice = _read_slice_labels(Path(slice_labels)) if slice_labels is not None else {}
    with tempfile.TemporaryDirectory(prefix="pacsnode-collect-") as tmp:
        target = Path(index_path) if index_path is not None else Path(tmp) / "index.sqlite"
        build_index([Path(data)], target, workers=workers, progress=False)
        scan = _scan(target, Path(data), wanted)

    unknown = set(study_labels.rows) - scan.studies
    if unknown:
        raise ValueError(
            f"{len(unknown)} label row(s) name studies that are not in {data}: {_first(unknown)}"
        )
    unknown_sops = set(per_slice) - scan.sops
    if unknown_sops:
        raise ValueError(
            f"{len(unknown_sops)} slice label row(s) name images that are not in {data}: "
            f"{_first(unknown_sops)}"
        )
    if not scan.best:
        raise ValueError(
            f"no studies with images of modality {'/'.join(sorted(wanted))} in {data} "
            f"(modalities found: {', '.join(sorted(scan.modalities)) or 'none'})"
        )
    missing_segs = {
        uid: seg for uid, seg in study_labels.seg_paths.items() if uid in scan.best and not seg.is_file()
    }
    if missing_segs:
        raise ValueError(f"{len(missing_segs)} seg_path(s) do not exist, for studies {_first(missing_segs)}")

    items: list[StudyItem] = []
    used_sops: set[str] = set()
    for study_uid in sorted(scan.best):
        if study_uid not in study_labels.rows:
            continue
        rows = scan.best[study_uid]
        first = rows[0]
        slices = [SliceRef(Path(row.path), row.frame, row.sop_uid, row.slice_position) for row in rows]
        sops = {ref.sop_uid for ref in slices}
        used_sops.update(sops)
        spacing = (
            (float(first.spacing_row), float(first.spacing_col))
            if first.spacing_row is not None and first.spacing_col is not None
            else None
        )
        items.append(
            StudyItem(
                study_uid=study_uid,
                patient_key=_read_patient_key(Path(first.path), study_uid),
                modality=first.modality,
                series_uid=first.series_uid,
                slices=slices,
                labels=dict(study_labels.rows[study_uid]),
                slice_labels={sop: dict(per_slice[sop]) for sop in sorted(sops & set(per_slice))},
                seg_path=study_labels.seg_paths.get(study_uid),
                pixel_spacing=spacing,
                slice_spacing=_slice_spacing(rows),
            )
        )
    unlabelled = len(set(scan.best) - set(study_labels.rows))
    summary = CollectSummary(
        studies=len(items),
        unlabelled=unlabelled,
        other_modality=len(set(study_labels.rows) - set(scan.best)),
        skipped_frames=scan.skipped_frames,
        slice_labels_unused=len(set(per_slice) - used_sops),
    )
    if not items:
        raise ValueError(
            f"none of the {len(scan.best)} studies of modality {'/'.join(sorted(wanted))} in {data} "
            f"has a label row in {Path(labels).name}"
        )
    if unlabelled:
        log.warning(
            "%d studies of modality %s have no label row and are left out",
            unlabelled,
            "/".join(sorted(wanted)),
        )
    if summary.slice_labels_unused:
        log.warning(
            "%d slice label rows name images outside the chosen series and are not used",
            summary.slice_labels_unused,
        )
    return StudyList(items, summary)


def read_seg_masks(item: StudyItem) -> dict[str, np.ndarray]:
    """Ground-truth masks of ``item`` by source SOP UID: boolean (rows, columns), segments united.

    Every slice of the item's series gets a mask; slices the SEG has no frames for are all False.
    A study labelled negative without a SEG gets all-False masks (shapes from the slices'
    headers); a positive one without a SEG is an error, since its masks are unknown, not empty.
    FRACTIONAL segments count as inside at > 0.5.

    Raises ``ValueError`` when the SEG cannot be read or references images that are not slices of
    the item's series (a SEG filed under the wrong study, or made on another series).
    """
    sops = [ref.sop_uid for ref in item.slices]
    if len(set(sops)) != len(sops):
        raise ValueError(
            f"study {item.study_uid}: its series has multi-frame images; masks keyed by SOP UID need "
            "one frame per instance"
        )
    if item.seg_path is None:
        if item.labels.get("any", 0.0) > 0.5:
            raise ValueError(
                f"study {item.study_uid} is labelled positive but has no SEG: its masks are unknown"
            )
        return {ref.sop_uid: _empty_mask(ref) for ref in item.slices}
    seg_name = item.seg_path.name
    try:
        seg = hd.seg.segread(item.seg_path)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"SEG {seg_name} of study {item.study_uid} cannot be read: {exc}") from exc
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    if not referenced:
        raise ValueError(f"SEG {seg_name} references no source images")
    unknown = referenced - set(sops)
    if unknown:
        raise ValueError(
            f"SEG {seg_name} references {len(unknown)} image(s) that are not slices of series "
            f"{item.series_uid} of study {item.study_uid}: {_first(unknown)}"
        )
    wanted = [sop for sop in sops if sop in referenced]
    pixels = seg.get_pixels_by_source_instance(
        wanted, assert_missing_frames_are_empty=True, skip_overlap_checks=True
    )
    fractional = str(seg.SegmentationType).upper() == "FRACTIONAL"
    united = np.asarray((pixels > 0.5 if fractional else pixels > 0).any(axis=-1), dtype=bool)
    shape = (int(seg.Rows), int(seg.Columns))
    found = {sop: united[position] for position, sop in enumerate(wanted)}
    return {sop: found[sop] if sop in found else np.zeros(shape, dtype=bool) for sop in sops}


def _empty_mask(ref: SliceRef) -> np.ndarray:
    ds = pydicom.dcmread(ref.path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return np.zeros((int(ds.Rows), int(ds.Columns)), dtype=bool)


def _stratum(item: StudyItem) -> int:
    """1 positive, 0 negative, -1 without an ``any`` label (a stratum of its own)."""
    value = item.labels.get("any")
    if value is None:
        return -1
    return 1 if value > 0.5 else 0


def _rank(seed: int, key: str) -> str:
    """A seeded order that does not depend on the input order or on which other keys exist."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _allocate(total: int, fractions: Sequence[float]) -> list[int]:
    """Counts per split summing to ``total``: one for every split with a share first (when there are
    enough), then each next one to the split furthest below its share."""
    counts = [0] * len(fractions)
    sharing = [i for i, fraction in enumerate(fractions) if fraction > 0]
    if total >= len(sharing):
        for i in sharing:
            counts[i] = 1
    while sum(counts) < total:
        deficits = [fraction * total - counts[i] for i, fraction in enumerate(fractions)]
        counts[max(range(len(fractions)), key=lambda i: (deficits[i], -i))] += 1
    return counts


def patient_split(
    items: Sequence[StudyItem], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[StudyItem]]:
    """Train/val/test by patient: no patient in two splits, stratified by ``any``, deterministic.

    A patient is positive when any of their studies is. Within each stratum (positive, negative,
    unlabelled) patients are ordered by a seeded hash of their key and cut by ``fractions``, each
    split with a non-zero fraction getting at least one patient of the stratum when the stratum has
    enough, so validation and test see positives whenever there are three positive patients. The
    result depends on the items and the seed only, not on their order; fractions apply to patients.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    patients: dict[str, int] = {}
    for item in items:
        patients[item.patient_key] = max(patients.get(item.patient_key, -1), _stratum(item))
    split_of: dict[str, str] = {}
    for stratum in sorted(set(patients.values())):
        keys = sorted(
            (key for key, value in patients.items() if value == stratum), key=lambda k: _rank(seed, k)
        )
        start = 0
        for name, count in zip(SPLITS, _allocate(len(keys), fractions), strict=True):
            split_of.update((key, name) for key in keys[start : start + count])
            start += count
    return {name: [item for item in items if split_of[item.patient_key] == name] for name in SPLITS}


def subsample(
    items: Sequence[StudyItem], fraction: float | None = None, count: int | None = None, seed: int = 0
) -> list[StudyItem]:
    """A stratified, deterministic, nested subset of ``items`` (label-fraction experiments), in input order.

    Give exactly one of ``fraction`` (0 < f <= 1; ``round(f * n)``, at least 1) or ``count``.
    The items are put in one seeded order whose every prefix is stratified by ``any`` (each next
    item comes from the stratum furthest below its share; within a stratum, by a seeded hash of
    the study UID) and the subset is a prefix, so with one seed a smaller subset is always
    contained in a larger one.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction and count")
    total = len(items)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        wanted = min(total, max(1, round(fraction * total)))
    else:
        assert count is not None
        if not 1 <= count <= total:
            raise ValueError(f"count must be between 1 and the {total} items, got {count}")
        wanted = count
    strata: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        strata.setdefault(_stratum(item), []).append(position)
    queues = {
        stratum: sorted(positions, key=lambda p: (_rank(seed, items[p].study_uid), p))
        for stratum, positions in strata.items()
    }
    taken = dict.fromkeys(queues, 0)
    chosen: set[int] = set()
    for step in range(1, wanted + 1):
        stratum = max(
            (s for s in sorted(queues) if taken[s] < len(queues[s])),
            key=lambda s: (len(queues[s]) * step / total - taken[s], len(queues[s])),
        )
        chosen.add(queues[stratum][taken[stratum]])
        taken[stratum] += 1
    return [item for position, item in enumerate(items) if position in chosen]
