"""``pacsnode pretrain index|prepare|merge|train|export``: the self-supervised encoder from the archive.

Each verb is a thin shell over one module; errors in inputs become one-line CLI messages. ``train``
is also what ``torchrun`` starts (``torchrun --nproc-per-node N --no-python pacsnode pretrain train ...``:
the console script, so no folder in the working directory shadows our packages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="Self-supervised pretraining (SwAV) on the archive: index, prepare, train, export.",
                  no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {message}")
    return typer.Exit(2)


@app.command()
def index(
    archive: Annotated[list[Path], typer.Option("--archive", help="A folder of DICOM files (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="The index file (SQLite); grown incrementally.")],
    workers: Annotated[int | None, typer.Option(help="Header-reading processes (default: CPU count).")] = None,
) -> None:
    """Read the headers of every DICOM file under the archives and record each image frame."""
    from pretrain.index import build_index

    missing = [str(path) for path in archive if not path.is_dir()]
    if missing:
        raise _fail(f"--archive is not a folder: {', '.join(missing)}")
    summary = build_index(archive, out, workers=workers)
    console = Console()
    console.print(f"indexed {summary.files_read} new/changed file(s) of {summary.files_seen} "
                  f"({summary.files_per_s:.0f} files/s); {summary.frames} image frame(s) in {out}")
    for reason, count in sorted(summary.skipped.items()):
        console.print(f"  skipped {count:>6}  {reason}")


@app.command()
def prepare(
    index_path: Annotated[Path, typer.Option("--index", help="An index written by `pretrain index`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards.")],
    size: Annotated[int, typer.Option(min=16, help="Working resolution (square, letterboxed).")] = 256,
    slice_stride: Annotated[int, typer.Option(min=1, help="Take every N-th slice of a volume.")] = 4,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 1024,
    labels: Annotated[Path | None, typer.Option(help="Optional CSV of labels (study_uid or sop_uid + columns).")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: CPU count).")] = None,
    part: Annotated[str | None, typer.Option(help="Only part K of N of the studies (K/N, 1-based): run the parts "
                                                  "on several hosts, then `pretrain merge` them.")] = None,
) -> None:
    """Decode, normalise per modality and resize every indexed image into streamable shards."""
    from pretrain.partition import Part
    from pretrain.prepare import prepare_shards

    if not index_path.is_file():
        raise _fail(f"--index {index_path} does not exist")
    if labels is not None and not labels.is_file():
        raise _fail(f"--labels {labels} does not exist")
    try:
        chosen = Part.parse(part) if part is not None else None
    except ValueError as error:
        raise _fail(str(error)) from error
    manifest = prepare_shards(index_path, out, size=size, slice_stride=slice_stride, shard_size=shard_size,
                              labels=labels, workers=workers, part=chosen)
    console = Console()
    console.print(f"wrote {manifest.total} image(s) from {manifest.studies} studies in "
                  f"{len(manifest.shards)} shard(s) to {out}: {manifest.modalities}")
    for reason, count in sorted(manifest.skipped.items()):
        console.print(f"  skipped {count:>6}  {reason}")


@app.command()
def merge(
    parts: Annotated[list[Path], typer.Argument(help="The part folders written by `prepare --part K/N`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged manifest (the shards stay in place).")],
) -> None:
    """One shard folder over the parts prepared on several hosts: what `train --shards` reads."""
    from pretrain.partition import merge_parts

    try:
        manifest = merge_parts(parts, out)
    except (ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from error
    Console().print(f"merged {len(parts)} part(s): {manifest.total} image(s) from {manifest.studies} studies in "
                    f"{len(manifest.shards)} shard(s), manifest in {out}")


@app.command()
def train(
    shards: Annotated[Path, typer.Option("--shards", help="Folder written by `pretrain prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, log.csv, config.yaml.")],
    config: Annotated[Path | None, typer.Option("--config", help="Recipe YAML (default: config/pretrain.yaml).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (overrides run.device).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint if present.")] = True,
) -> None:
    """SwAV training; run it under torchrun for several GPUs or nodes."""
    from pretrain import runtime as rt
    from pretrain.config import load_config
    from pretrain.train import train as run_training

    overrides: dict[str, Any] = {"run": {}}
    if device is not None:
        overrides["run"]["device"] = device
    if max_steps is not None:
        overrides["run"]["max_steps"] = max_steps
    try:
        recipe = load_config(config, overrides)
    except (OSError, ValidationError, ValueError, TypeError) as exc:
        raise _fail(f"--config: {exc}") from None
    try:
        runtime = rt.start(recipe.run.device)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        result = run_training(shards, recipe, out, runtime)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        rt.stop(runtime)
    if runtime.is_main:
        Console().print(f"trained {result.steps} step(s); checkpoint {result.checkpoint}; log {result.log}")


@app.command()
def export(
    checkpoint_path: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file or run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for encoder.safetensors and encoder.yaml.")],
) -> None:
    """Write the pretrained encoder and its card, in the form `pacsnode finetune --init` loads."""
    from pretrain.export import export_encoder

    try:
        card = export_encoder(checkpoint_path, out)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise _fail(str(exc)) from None
    Console().print(f"exported {card.encoder.arch} ({card.steps} steps, sha256 {card.sha256[:12]}) to {out}")
