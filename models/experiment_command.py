"""``pacsnode experiment paper``: the paper's pretraining experiment on phantom data (models.experiment)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Experiments that test the paper's claims on phantom data.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """Experiments that test the paper's claims on phantom data."""


@app.command()
def paper(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: one seed, small sets, short training (proves nothing).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Working folder, resumable (default: "
                                                          "bench/.cache/experiment-paper[-quick]).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    report_dir: Annotated[Path | None, typer.Option(help="Report folder (default: bench/results/experiment-paper for "
                                                         "the full run, OUT/report for --quick).")] = None,
    budget_minutes: Annotated[float | None, typer.Option(min=0.0, help="Start no new arm after this many minutes "
                                                                       "(resume later with the same command).")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", hidden=True, help="Harness check with tiny sizes (tests).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
) -> None:
    """Scratch vs pretrained vs hybrid finetuning on all three tasks, with the phantom difficulty frozen
    first on the scratch arm; resumable (finished arms are kept and skipped)."""
    from models.experiment import ExperimentSettings, default_work_dir, run_paper_experiment

    if quick and tiny:
        raise typer.BadParameter("--quick and --tiny exclude each other")
    mode = "tiny" if tiny else "quick" if quick else "full"
    folder = out or default_work_dir(mode)
    command = "pacsnode " + " ".join(shlex.quote(arg) for arg in ["experiment", "paper", *sys.argv[3:]]) \
        if sys.argv[1:3] == ["experiment", "paper"] else None
    try:
        result = run_paper_experiment(folder, quick=quick, device=device, progress=not quiet,
                                      settings=ExperimentSettings.preset(mode), report_dir=report_dir,
                                      command=command, budget_minutes=budget_minutes)
    except ValueError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console = Console()
    state = "complete" if result["complete"] else "incomplete (rerun the same command to resume)"
    console.print(f"experiment {mode}: {state} in {result['wall_s'] / 60:.1f} min; report {result['report']['markdown']}")
    for task, rows in result["summary"].items():
        cells = ", ".join(f"{key} {row['test']:.3f}" if row["test"] is not None else f"{key} n/a"
                          for key, row in rows.items())
        console.print(f"  {task}: {cells}")


@app.command()
def levers(
    only: Annotated[list[str] | None, typer.Option("--only", help="Measure only this lever (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Working folder, resumable (default: "
                                                          "bench/.cache/pretrain-levers).")] = None,
    report_dir: Annotated[Path | None, typer.Option(help="Where levers.md and levers.json go (default: "
                                                         "bench/results/pretrain-levers).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Pretrain one encoder per lever (archive size, length, local crops, prototypes, size) and gauge
    each by the linear probe against random init; cached, so a rerun trains only what is new."""
    from models.experiment_levers import default_report_dir, default_work_dir, run_levers

    try:
        result = run_levers(out or default_work_dir(), report_dir or default_report_dir(), only=only, device=device)
    except ValueError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    Console().print(f"levers measured: {', '.join(result['measured']) or 'none'}; report {result['report']}")
