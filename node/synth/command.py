"""``pacsnode synth``: write a deterministic set of phantom DICOM studies with ground truth."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from node.synth.spec import DIFFICULTY_PRESETS, KINDS, Difficulty, parse_kinds


def _difficulty(
    preset: str,
    prevalence: float | None,
    lesion_min_mm: float | None,
    lesion_max_mm: float | None,
    lesion_contrast: float | None,
    lesion_count_min: int | None,
    lesion_count_max: int | None,
    noise: float | None,
    anatomy_variation: float | None,
) -> Difficulty:
    """The preset with the options given on the command line overriding it."""
    try:
        base = Difficulty.preset(preset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--difficulty") from None
    size = (
        base.lesion_size_mm[0] if lesion_min_mm is None else lesion_min_mm,
        base.lesion_size_mm[1] if lesion_max_mm is None else lesion_max_mm,
    )
    count = (
        base.lesion_count[0] if lesion_count_min is None else lesion_count_min,
        base.lesion_count[1] if lesion_count_max is None else lesion_count_max,
    )
    try:
        return Difficulty(
            lesion_size_mm=size,
            lesion_contrast=base.lesion_contrast if lesion_contrast is None else lesion_contrast,
            lesion_count=count,
            noise=base.noise if noise is None else noise,
            anatomy_variation=base.anatomy_variation if anatomy_variation is None else anatomy_variation,
            prevalence=base.prevalence if prevalence is None else prevalence,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (created if missing).")],
    studies: Annotated[int, typer.Option(min=0, help="Studies per kind.")] = 6,
    kinds: Annotated[str, typer.Option(help=f"Comma-separated kinds: {', '.join(KINDS)}.")] = ",".join(KINDS),
    seed: Annotated[int, typer.Option(help="Seed: the same seed and options give byte-identical files.")] = 0,
    difficulty: Annotated[
        str,
        typer.Option(
            help=f"Difficulty preset ({', '.join(DIFFICULTY_PRESETS)}); the options below override it."
        ),
    ] = "standard",
    prevalence: Annotated[
        float | None, typer.Option(help="Fraction of studies of each kind with findings.")
    ] = None,
    lesion_min_mm: Annotated[float | None, typer.Option(help="Smallest lesion diameter (mm).")] = None,
    lesion_max_mm: Annotated[float | None, typer.Option(help="Largest lesion diameter (mm).")] = None,
    lesion_contrast: Annotated[
        float | None, typer.Option(help="Lesion contrast, times a typical clinical one.")
    ] = None,
    lesion_count_min: Annotated[int | None, typer.Option(help="Fewest lesions in a positive study.")] = None,
    lesion_count_max: Annotated[int | None, typer.Option(help="Most lesions in a positive study.")] = None,
    noise: Annotated[float | None, typer.Option(help="Image noise, times a typical clinical level.")] = None,
    anatomy_variation: Annotated[
        float | None, typer.Option(help="Spread of anatomy between patients (0: none).")
    ] = None,
    ct_slices: Annotated[int, typer.Option(min=1, help="Slices per head CT series.")] = 24,
    mr_slices: Annotated[int, typer.Option(min=1, help="Slices per brain MR series.")] = 24,
    ct_size: Annotated[int, typer.Option(min=32, help="Rows and columns of a head CT slice.")] = 512,
    mr_size: Annotated[int, typer.Option(min=32, help="Rows and columns of a brain MR slice.")] = 512,
    cxr_size: Annotated[int, typer.Option(min=32, help="Rows and columns of a chest radiograph.")] = 512,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (0: one per CPU, at most 4).")] = 0,
    patient_prefix: Annotated[
        str,
        typer.Option(help="Start of every PatientID; give sets that must share no patient different ones."),
    ] = "PH",
) -> None:
    """Write deterministic phantom DICOM studies with ground truth, for tests, demos and benchmarks.

    cxr: PA chest radiograph (DX): nodule, consolidation, effusion, cardiomegaly.

    ct-head: axial head CT: epidural, subdural, subarachnoid, intraparenchymal, intraventricular bleeds.

    mr-brain: post-contrast T1 brain MR: enhancing metastases, with count and volume.

    Images go to dicom/<study>/<series>/<sop>.dcm, lesion masks as DICOM SEG to seg/<study>/<sop>.dcm.

    Labels: labels.csv, slice_labels.csv (head CT) and manifest.json. Patients are synthetic.
    """
    from node.synth.generate import default_workers, generate
    from node.synth.roster import check_patient_prefix

    try:
        chosen = parse_kinds(kinds)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kinds") from None
    try:
        check_patient_prefix(patient_prefix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--patient-prefix") from None
    level = _difficulty(
        difficulty,
        prevalence,
        lesion_min_mm,
        lesion_max_mm,
        lesion_contrast,
        lesion_count_min,
        lesion_count_max,
        noise,
        anatomy_variation,
    )
    total = studies * len(chosen)
    processes = workers or default_workers(total)
    console = Console(stderr=True)
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("synth: studies", total=total)

        def advance(record: object) -> None:
            # Only the kind is shown: never a patient name or ID.
            kind = getattr(record, "kind", "")
            progress.update(task, advance=1, description=f"synth: {kind:<8}")

        manifest = generate(
            out,
            studies,
            chosen,
            seed,
            level,
            ct_slices,
            mr_slices,
            ct_size=ct_size,
            mr_size=mr_size,
            cxr_size=cxr_size,
            workers=processes,
            on_study=advance,
            patient_prefix=patient_prefix,
        )
    elapsed = time.perf_counter() - started
    for kind in chosen:
        of_kind = manifest.of_kind(kind)
        positives = sum(study.positive for study in of_kind)
        instances = sum(len(study.instances) for study in of_kind)
        console.print(f"{kind:<9} {len(of_kind)} studies ({positives} with findings), {instances} instances")
    console.print(
        f"wrote {manifest.n_instances} instances in {elapsed:.1f} s to {manifest.out_dir} "
        f"(labels.csv, slice_labels.csv, manifest.json)"
    )
