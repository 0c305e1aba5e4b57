"""``pacsnode finetune`` and ``pacsnode models list|show|register``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from models.preprocess import InputSpec

models_app = typer.Typer(help="The model registry: list, show and register model versions.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {message}")
    return typer.Exit(2)


def _models_dir(config: Path | None, override: Path | None) -> Path:
    if override is not None:
        return override
    from config.settings import load_settings

    return load_settings(config).workers.models_dir


def _input_override(declared: InputSpec, size: int | None, windows: str | None, neighbours: int | None) -> InputSpec | None:
    """The task's declared input with the options given on the command line; None when none was."""
    from models.preprocess import InputSpec

    if size is None and windows is None and neighbours is None:
        return None
    changes: dict[str, object] = {}
    if size is not None:
        changes["size"] = size
    if neighbours is not None:
        changes["neighbours"] = neighbours
    if windows is not None:
        names = [w.strip() for w in windows.split(",") if w.strip()]
        chosen = InputSpec.ct(declared.size, names)
        changes.update(channels=chosen.channels, windows=chosen.windows)
    return InputSpec.model_validate({**declared.model_dump(), **changes})


def finetune(
    task: Annotated[str, typer.Option(help="cxr-abnormality, ct-hemorrhage or mr-metastasis.")],
    data: Annotated[Path, typer.Option(help="Folder of DICOM studies.")],
    labels: Annotated[Path, typer.Option(help="CSV of study labels (study_uid + finding columns; seg_path for SEG).")],
    init: Annotated[str, typer.Option(help="'scratch' or an exported encoder folder.")] = "scratch",
    regime: Annotated[str, typer.Option(help="supervised or hybrid (supervised + SwAV loss).")] = "supervised",
    slice_labels: Annotated[Path | None, typer.Option(help="Per-slice labels CSV (sop_uid + columns).")] = None,
    label_fraction: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Train on this share of the labelled training studies.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the model (default: runs/finetune/<task>).")] = None,
    register: Annotated[bool, typer.Option(help="Register the model in the registry afterwards.")] = True,
    name: Annotated[str | None, typer.Option(help="Model name (default: the task name = its pipeline).")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 300,
    size: Annotated[int | None, typer.Option(min=16, help="Input size (letterboxed square; default: the task's).")] = None,
    windows: Annotated[str | None, typer.Option(help="CT windows as channels, e.g. brain,subdural,bone (default: the task's).")] = None,
    neighbours: Annotated[int | None, typer.Option(min=0, max=4, help="2.5D: slices on each side as extra channels (default: the task's).")] = None,
    arch: Annotated[str, typer.Option(help="resnet18, resnet50 or densenet121 (must match --init's encoder).")] = "resnet18",
    head_stride: Annotated[int | None, typer.Option(
        help="Feature-map stride a classifier's head reads: 32, 16, 8 or 4 (default: the recipe's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    min_cases_for_threshold: Annotated[int, typer.Option(
        min=1, help="A finding gets a threshold (and calls) only with this many positive and negative "
                    "validation studies.")] = 10,
    finding_auc_gate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Findings with a lower validation AUC get no calls; classifiers with a lower "
                               "mean validation study AUC are not deployable (0: off).")] = 0.70,
    dice_gate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Segmentation models with a lower validation mean Dice are not deployable "
                               "(0: off).")] = 0.5,
    config: Annotated[Path | None, typer.Option("--config", help="pacsnode settings (for models_dir).")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Registry folder (overrides the settings).")] = None,
) -> None:
    """Finetune a task model from scratch or from a pretrained encoder, then register it (a model below
    its gate registers too, marked not deployable, and workers refuse it)."""
    from models.finetune import FinetuneConfig
    from models.registry import next_version
    from models.registry import register as add
    from models.tasks import task_spec
    from models.training import train_task_model

    console = Console()
    root = _models_dir(config, models_dir)
    try:
        spec = task_spec(task)
        settings = FinetuneConfig(regime=regime, steps=steps, arch=arch, device=device, seed=seed,
                                  input=_input_override(spec.input, size, windows, neighbours),
                                  min_cases_for_threshold=min_cases_for_threshold, finding_auc_gate=finding_auc_gate,
                                  dice_gate=dice_gate, **({} if head_stride is None else {"head_stride": head_stride}))
        model_name = name or task
        version = next_version(root, model_name)
        target = out or Path("runs/finetune") / f"{model_name}-{version}"
        bar = Progress(TextColumn("finetune"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), console=Console(stderr=True))
        job = bar.add_task("finetune", total=steps, info="")
        best: list[float] = []

        def show(step: int, loss: float, metric: float | None) -> None:
            if metric is not None:
                best.append(max([metric, *best]))
            info = f"loss {loss:.3f}" + (f"  best val {best[-1]:.3f}" if best else "")
            bar.update(job, completed=step, info=info)

        with bar:
            trained = train_task_model(task, data, labels, settings, init=init, out=target, name=model_name,
                                       version=version, slice_labels=slice_labels, label_fraction=label_fraction,
                                       progress=show, announce=console.print)
    except (ValueError, ValidationError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    result, card = trained.result, trained.card
    console.print(f"validation {card.validation['metric']} {result.best_metric:.3f} at step {result.best_step} "
                  f"of {result.steps_run}; model in {target}")
    console.print(f"{'deployable' if card.deployable else 'NOT deployable'}: {card.deployability}")
    for output in card.outputs:
        if not output.assessed:
            console.print(f"  {output.name}: not assessed, {output.not_assessed_reason}")
    if register:
        console.print(f"registered {card.name}@{card.version} at {add(root, target)}")


@models_app.command("list")
def list_cmd(
    config: Annotated[Path | None, typer.Option("--config")] = None,
    models_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Registered model versions."""
    from models.registry import list_models

    table = Table("name", "version", "task", "validation", "deployable", "findings assessed", "device UID", "created")
    for card in list_models(_models_dir(config, models_dir)):
        value = card.validation.get("value")
        assessed = [o.name for o in card.outputs if o.assessed]
        table.add_row(card.name, card.version, card.task,
                      f"{card.validation.get('metric', '')} {value:.3f}" if isinstance(value, float) else "",
                      "yes" if card.deployable else f"no: {card.deployability}",
                      ", ".join(assessed) if assessed else "none", card.device_uid, card.created)
    Console().print(table)


@models_app.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    config: Annotated[Path | None, typer.Option("--config")] = None,
    models_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """A model version's card."""
    from models.registry import resolve, verify

    try:
        card = verify(resolve(_models_dir(config, models_dir), ref))
    except (LookupError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))


@models_app.command("register")
def register_cmd(
    folder: Annotated[Path, typer.Argument(help="A model folder (model.safetensors + card.yaml).")],
    config: Annotated[Path | None, typer.Option("--config")] = None,
    models_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Copy a model folder into the registry under its card's name and version."""
    from models.registry import register

    try:
        target = register(_models_dir(config, models_dir), folder)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    Console().print(f"registered at {target}")


@models_app.command("import-labels")
def import_labels_cmd(
    labels: Annotated[Path, typer.Option("--csv", help="The data set's label file (e.g. RSNA stage_2_train.csv).")],
    data: Annotated[Path, typer.Option(help="Folder of the DICOM images the labels are for.")],
    out: Annotated[Path, typer.Option(help="Folder for labels.csv and slice_labels.csv.")],
    kind: Annotated[str, typer.Option("--format", help="rsna-ich (RSNA Intracranial Hemorrhage Detection).")] = "rsna-ich",
) -> None:
    """Turn a public data set's labels into the CSVs `pacsnode finetune` reads."""
    from models.label_import import FORMATS, import_rsna_ich

    if kind not in FORMATS:
        raise _fail(f"--format {kind!r}: known formats are {', '.join(FORMATS)}")
    try:
        summary = import_rsna_ich(labels, data, out)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    Console().print(f"{summary.studies} studies, {summary.slices} labelled images -> {summary.labels_csv}, "
                    f"{summary.slice_labels_csv}; {summary.labelled_not_in_data} label rows' images not in {data}, "
                    f"{summary.images_without_labels} images without labels")


def evaluate(
    model: Annotated[str, typer.Option(help="NAME or NAME@VERSION from the registry.")],
    data: Annotated[Path, typer.Option(help="Folder of DICOM studies to evaluate on.")],
    labels: Annotated[Path, typer.Option(help="CSV of study labels (study_uid + finding columns; seg_path).")],
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md and the plots.")],
    slice_labels: Annotated[Path | None, typer.Option(help="Per-slice labels CSV.")] = None,
    robustness: Annotated[bool, typer.Option(help="Also measure under rotation, zoom, intensity and gamma.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    config: Annotated[Path | None, typer.Option("--config", help="pacsnode settings (for models_dir).")] = None,
    models_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """AUC with confidence intervals, sensitivity/specificity at the card's thresholds, Dice and lesion
    detection, and robustness curves, written as JSON, Markdown and PNG plots."""
    import torch

    from models.dataset import collect_studies
    from models.evaluate import evaluate as run
    from models.evaluate import headline, write_evaluation
    from models.registry import load_model, resolve

    try:
        network, card = load_model(resolve(_models_dir(config, models_dir), model))
        items = collect_studies(data, labels, modality=card.applies_to.modalities, slice_labels=slice_labels)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    result, plots = run(network, card, items, robustness=robustness, device=torch.device(device))
    written = write_evaluation(out, result, plots)
    Console().print(f"{card.name}@{card.version} on {len(items)} studies: headline {headline(card, result):.3f}; "
                    f"wrote {', '.join(p.name for p in written.values())} to {out}")
