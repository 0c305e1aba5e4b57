"""The generator: plan the studies, render each kind, write DICOM, SEG and label tables.

Each study draws from its own random streams (keyed by seed, kind and index), so a study is the
same whatever else the run makes; the anatomy is keyed by patient, so one patient's head CT and
brain MR show the same head.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydicom.dataset import Dataset

from node.synth.ct_head import RESCALE_INTERCEPT, build_ct_head, slice_masks
from node.synth.cxr import BITS_STORED, build_cxr, sample_chest
from node.synth.determinism import derive_rng, derive_uid
from node.synth.grid import AxialGrid
from node.synth.head import head_grid, sample_head, sample_tissues
from node.synth.headers import SeriesInfo, ct_dataset, ct_template, dx_dataset, mr_dataset, mr_template
from node.synth.lesions import LesionRecord, Placement, merge_masks
from node.synth.manifest import Manifest, SliceLabels, StudyRecord
from node.synth.mr_brain import build_mr_brain
from node.synth.roster import DEFAULT_PATIENT_PREFIX, StudyPlan, check_patient_prefix, plan_studies
from node.synth.seg import build_seg
from node.synth.spec import CT_FINDINGS, FINDINGS, Difficulty, Kind, parse_kinds
from node.synth.writer import instance_path, seg_path, write_dataset, write_tables

log = logging.getLogger(__name__)

SERIES_DESCRIPTIONS: Mapping[Kind, str] = MappingProxyType(
    {
        "cxr": "PA CHEST",
        "ct-head": "HEAD AXIAL H30s",
        "mr-brain": "AX T1 SE POST GD",
    }
)
MODALITIES: Mapping[Kind, str] = MappingProxyType({"cxr": "DX", "ct-head": "CT", "mr-brain": "MR"})


@dataclass(frozen=True)
class Geometry:
    """Image sizes and slice counts of a run."""

    ct_slices: int = 24
    mr_slices: int = 24
    ct_size: int = 512
    mr_size: int = 512
    cxr_size: int = 512

    def __post_init__(self) -> None:
        if min(self.ct_slices, self.mr_slices) < 1:
            raise ValueError("slice counts must be >= 1")
        if min(self.ct_size, self.mr_size, self.cxr_size) < 32:
            raise ValueError("image sizes must be >= 32")

    def as_dict(self) -> dict[str, int]:
        return {
            "ct_slices": self.ct_slices,
            "mr_slices": self.mr_slices,
            "ct_size": self.ct_size,
            "mr_size": self.mr_size,
            "cxr_size": self.cxr_size,
        }


@dataclass(frozen=True)
class _Context:
    out_dir: Path
    seed: int
    difficulty: Difficulty
    geometry: Geometry


def _series(ctx: _Context, plan: StudyPlan) -> SeriesInfo:
    return SeriesInfo(
        plan=plan,
        series_uid=derive_uid(ctx.seed, plan.kind, plan.index, "series"),
        frame_of_reference_uid=derive_uid(ctx.seed, plan.kind, plan.index, "frame-of-reference"),
        number=1,
        description=SERIES_DESCRIPTIONS[plan.kind],
        start=plan.study_datetime + timedelta(minutes=2),
    )


def _lesion_records(placements: list[Placement], voxel_volume: float) -> tuple[LesionRecord, ...]:
    return tuple(
        LesionRecord(
            finding=p.finding,
            centre_mm=tuple(float(c) for c in p.centre),
            size_mm=p.size_mm,
            voxels=p.voxels,
            volume_mm3=p.voxels * voxel_volume,
        )
        for p in placements
    )


def _labels(kind: Kind, masks: dict[str, np.ndarray]) -> dict[str, int]:
    # merge_masks keeps only findings with at least one voxel: presence is membership.
    labels = {name: int(name in masks) for name in FINDINGS[kind]}
    labels["any"] = int(any(labels.values()))
    return labels


def _write_seg(
    ctx: _Context,
    plan: StudyPlan,
    sources: Sequence[Dataset],
    masks: dict[str, np.ndarray],
    kind: Kind,
) -> tuple[str | None, str | None]:
    present = [(name, masks[name]) for name in FINDINGS[kind] if name in masks]
    if not present:
        return None, None
    sop_uid = derive_uid(ctx.seed, plan.kind, plan.index, "seg")
    seg = build_seg(
        sources,
        present,
        series_uid=derive_uid(ctx.seed, plan.kind, plan.index, "seg-series"),
        sop_uid=sop_uid,
        dimension_uid=derive_uid(ctx.seed, plan.kind, plan.index, "seg-dimensions"),
        when=plan.study_datetime + timedelta(minutes=30),
    )
    relative = seg_path(plan.study_uid, sop_uid)
    write_dataset(ctx.out_dir, relative, seg)
    return relative.as_posix(), sop_uid


def _record(
    plan: StudyPlan,
    series: SeriesInfo,
    instances: list[str],
    seg: tuple[str | None, str | None],
    labels: dict[str, int],
    lesions: tuple[LesionRecord, ...],
    volume: float | None,
    extra: dict[str, float] | None = None,
) -> StudyRecord:
    return StudyRecord(
        study_uid=plan.study_uid,
        patient_id=plan.patient.patient_id,
        kind=plan.kind,
        modality=MODALITIES[plan.kind],
        series_uid=series.series_uid,
        study_date=plan.study_datetime.strftime("%Y%m%d"),
        patient_sex=plan.patient.sex,
        patient_age=plan.patient.age_at(plan.study_datetime.date()),
        instances=tuple(instances),
        seg_path=seg[0],
        seg_uid=seg[1],
        labels=labels,
        lesions=lesions,
        lesion_volume_mm3=volume,
        extra=extra or {},
    )


def _cxr_study(ctx: _Context, plan: StudyPlan) -> tuple[StudyRecord, list[SliceLabels]]:
    anatomy = sample_chest(ctx.seed, plan.patient.index, plan.patient.sex, ctx.difficulty.anatomy_variation)
    rng = derive_rng(ctx.seed, plan.kind, plan.index, "findings")
    image = build_cxr(rng, anatomy, ctx.geometry.cxr_size, ctx.difficulty, plan.positive)
    series = _series(ctx, plan)
    sop_uid = derive_uid(ctx.seed, plan.kind, plan.index, "sop", 0)
    ds = dx_dataset(series, sop_uid, image.pixels, image.pixel_spacing, BITS_STORED)
    relative = instance_path(plan.study_uid, series.series_uid, sop_uid)
    write_dataset(ctx.out_dir, relative, ds)
    masks = {name: mask[None] for name, mask in merge_masks(image.pixels.shape, image.placements).items()}
    seg = _write_seg(ctx, plan, [ds], masks, plan.kind)
    lesions = _lesion_records(image.placements, image.pixel_spacing**2)
    record = _record(
        plan, series, [relative.as_posix()], seg, _labels(plan.kind, masks), lesions, None, {"ctr": image.ctr}
    )
    return record, []


def _volume_instances(
    ctx: _Context,
    plan: StudyPlan,
    series: SeriesInfo,
    grid: AxialGrid,
    make: Callable[[str, int], Dataset],
) -> tuple[list[Dataset], list[str]]:
    sources: list[Dataset] = []
    paths: list[str] = []
    for k in range(grid.slices):
        sop_uid = derive_uid(ctx.seed, plan.kind, plan.index, "sop", k)
        ds = make(sop_uid, k)
        relative = instance_path(plan.study_uid, series.series_uid, sop_uid)
        write_dataset(ctx.out_dir, relative, ds)
        paths.append(relative.as_posix())
        del ds.PixelData  # the SEG needs the header only; keep memory flat on long series
        sources.append(ds)
    return sources, paths


def _ct_study(ctx: _Context, plan: StudyPlan) -> tuple[StudyRecord, list[SliceLabels]]:
    anatomy = sample_head(ctx.seed, plan.patient.index, ctx.difficulty.anatomy_variation)
    grid = head_grid(ctx.geometry.ct_size, ctx.geometry.ct_slices)
    tissues = sample_tissues(anatomy, grid)
    rng = derive_rng(ctx.seed, plan.kind, plan.index, "findings")
    ct = build_ct_head(rng, tissues, ctx.difficulty, plan.positive)
    del tissues
    series = _series(ctx, plan)
    template = ct_template(series, grid, RESCALE_INTERCEPT)
    sources, paths = _volume_instances(
        ctx, plan, series, grid, lambda uid, k: ct_dataset(template, series, uid, grid, k, ct.pixels[k])
    )
    masks = merge_masks(grid.shape, ct.placements)
    seg = _write_seg(ctx, plan, sources, masks, plan.kind)
    per_slice = slice_masks(grid, ct.placements)
    slices = []
    for k, ds in enumerate(sources):
        labels = {name: int(bool(per_slice[name][k])) if name in per_slice else 0 for name in CT_FINDINGS}
        labels["any"] = int(any(labels.values()))
        slices.append(
            SliceLabels(
                plan.study_uid,
                series.series_uid,
                str(ds.SOPInstanceUID),
                k + 1,
                float(grid.z0 + k * grid.slice_spacing),
                labels,
            )
        )
    lesions = _lesion_records(ct.placements, grid.voxel_volume)
    volume = sum(p.voxels for p in ct.placements) * grid.voxel_volume
    union = (
        float(np.count_nonzero(np.logical_or.reduce(list(masks.values()))) * grid.voxel_volume)
        if masks
        else 0.0
    )
    record = _record(
        plan,
        series,
        paths,
        seg,
        _labels(plan.kind, masks),
        lesions,
        union,
        {"sum_of_subtype_volumes_mm3": volume},
    )
    return record, slices


def _mr_study(ctx: _Context, plan: StudyPlan) -> tuple[StudyRecord, list[SliceLabels]]:
    anatomy = sample_head(ctx.seed, plan.patient.index, ctx.difficulty.anatomy_variation)
    grid = head_grid(ctx.geometry.mr_size, ctx.geometry.mr_slices)
    tissues = sample_tissues(anatomy, grid)
    rng = derive_rng(ctx.seed, plan.kind, plan.index, "findings")
    mr = build_mr_brain(rng, tissues, ctx.difficulty, plan.positive)
    del tissues
    series = _series(ctx, plan)
    template = mr_template(series, grid)
    sources, paths = _volume_instances(
        ctx, plan, series, grid, lambda uid, k: mr_dataset(template, series, uid, grid, k, mr.pixels[k])
    )
    masks = merge_masks(grid.shape, mr.placements)
    seg = _write_seg(ctx, plan, sources, masks, plan.kind)
    lesions = _lesion_records(mr.placements, grid.voxel_volume)
    volume = float(np.count_nonzero(masks["metastasis"]) * grid.voxel_volume) if masks else 0.0
    return _record(plan, series, paths, seg, _labels(plan.kind, masks), lesions, volume), []


_STUDY_MAKERS: Mapping[Kind, Callable[[_Context, StudyPlan], tuple[StudyRecord, list[SliceLabels]]]] = (
    MappingProxyType(
        {
            "cxr": _cxr_study,
            "ct-head": _ct_study,
            "mr-brain": _mr_study,
        }
    )
)


def _make_study(ctx: _Context, plan: StudyPlan) -> tuple[StudyRecord, list[SliceLabels]]:
    """Render and write one study (top level, so worker processes can run it)."""
    return _STUDY_MAKERS[plan.kind](ctx, plan)


def default_workers(studies: int) -> int:
    """Worker processes for ``studies`` studies: one per CPU, at most 4, none for a handful."""
    if studies < 4:
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


def _run(
    ctx: _Context,
    plans: list[StudyPlan],
    workers: int,
    on_study: Callable[[StudyRecord], None] | None,
) -> list[tuple[StudyRecord, list[SliceLabels]]]:
    """Make every study, in worker processes when ``workers > 1``; results in plan order.

    Each study draws only from its own seeded streams, so the files do not depend on which process
    made them or in which order they finished.
    """
    results: list[tuple[StudyRecord, list[SliceLabels]] | None] = [None] * len(plans)
    if workers <= 1 or len(plans) <= 1:
        for i, plan in enumerate(plans):
            made = _make_study(ctx, plan)
            results[i] = made
            if on_study is not None:
                on_study(made[0])
    else:
        # spawn, not fork: the caller may run threads (a refreshing progress bar) that fork copies mid-lock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(plans)), mp_context=context) as pool:
            futures = {pool.submit(_make_study, ctx, plan): i for i, plan in enumerate(plans)}
            for future in as_completed(futures):
                result = future.result()
                results[futures[future]] = result
                if on_study is not None:
                    on_study(result[0])
    done = [item for item in results if item is not None]
    if len(done) != len(plans):
        raise RuntimeError("a study was not generated")
    return done


def generate(
    out_dir: Path,
    studies: int,
    kinds: Sequence[str] | str,
    seed: int,
    difficulty: Difficulty | None = None,
    ct_slices: int = 24,
    mr_slices: int = 24,
    *,
    ct_size: int = 512,
    mr_size: int = 512,
    cxr_size: int = 512,
    workers: int = 1,
    on_study: Callable[[StudyRecord], None] | None = None,
    patient_prefix: str = DEFAULT_PATIENT_PREFIX,
) -> Manifest:
    """Generate ``studies`` studies of each of ``kinds`` under ``out_dir`` and return the manifest.

    Deterministic: the same arguments give byte-identical files, whatever ``workers``. With
    ``workers > 1`` studies are made in spawned processes (a script calling this then needs the
    ``if __name__ == "__main__":`` guard); ``default_workers`` suggests a count. ``on_study`` is
    called in this process after each study is written, in completion order (for progress).
    ``patient_prefix`` starts every PatientID (default ``PH``): IDs restart at 1 in every run, so
    sets that must not share a patient (a pretraining archive and a test set) get distinct prefixes.
    """
    check_patient_prefix(patient_prefix)
    chosen = parse_kinds(kinds if isinstance(kinds, str) else list(kinds))
    difficulty = difficulty or Difficulty()
    geometry = Geometry(
        ct_slices=ct_slices, mr_slices=mr_slices, ct_size=ct_size, mr_size=mr_size, cxr_size=cxr_size
    )
    ctx = _Context(out_dir=Path(out_dir), seed=seed, difficulty=difficulty, geometry=geometry)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    plans = plan_studies(seed, chosen, studies, difficulty.prevalence, patient_prefix=patient_prefix)
    records: list[StudyRecord] = []
    slices: list[SliceLabels] = []
    for record, study_slices in _run(ctx, plans, workers, on_study):
        records.append(record)
        slices.extend(study_slices)
    log.info("synth: %d studies, %d instances written", len(records), sum(len(r.instances) for r in records))

    manifest = Manifest(
        out_dir=ctx.out_dir,
        seed=seed,
        kinds=chosen,
        studies_per_kind=studies,
        difficulty=difficulty.as_dict(),
        geometry=geometry.as_dict(),
        studies=tuple(records),
        slices=tuple(slices),
    )
    write_tables(manifest)
    return manifest
