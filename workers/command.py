"""``pacsnode worker``: a Celery worker for the pipelines' queues."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Annotated

import typer

from config.settings import load_settings
from node.broker import pipeline_queue
from node.cli import not_installed


def worker(
    config: Annotated[Path | None, typer.Option(help="settings file (default: the shipped defaults)")] = None,
    queues: Annotated[str | None, typer.Option(help="comma-separated pipelines to serve (default: all routed)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: from the config)")] = None,
    concurrency: Annotated[int | None, typer.Option(help="worker processes; one per GPU")] = None,
    name: Annotated[str | None, typer.Option(help="worker node name")] = None,
) -> None:
    """Run a worker: consumes dispatched studies, reports outcomes to the node over the broker."""
    overrides: dict[str, object] = {}
    if device is not None:
        overrides["device"] = device
    if concurrency is not None:
        overrides["concurrency"] = concurrency
    settings = load_settings(config, **({"workers": overrides} if overrides else {}))
    try:
        from workers.app import create_app
    except ImportError as exc:  # an ingest-only install (no ml extra) with workers.embedded on
        raise not_installed("worker", exc) from exc

    pipelines = [q.strip() for q in queues.split(",")] if queues else sorted(
        {rule.pipeline for rule in settings.routing.rules}
    )
    if not pipelines:
        raise typer.BadParameter("no pipelines to serve: give --queues or routing rules", param_hint="--queues")
    app = create_app(settings, pipelines)
    app.worker_main(argv=[
        "worker",
        "--pool=prefork",
        f"--concurrency={settings.workers.concurrency}",
        f"--queues={','.join(pipeline_queue(p) for p in pipelines)}",
        f"--hostname={name or 'pacsnode@' + socket.gethostname()}",
        "--loglevel=INFO",
        "--without-mingle",
        "--without-gossip",
    ])


def demo(
    out: Annotated[Path, typer.Option(help="work folder: phantoms, models (reused next time), node data, results")] = Path(
        "pacsnode-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="tiny models and one study per family (a smoke run)")] = False,
) -> None:
    """Phantom studies through the whole node on embedded defaults: models built once (short SwAV pretraining
    + finetuning), node + worker + a local PACS started, studies sent, findings printed; exits 0 when every
    study's results reached the local PACS."""
    from rich.console import Console

    from node.logs import configure_logging
    from workers.demo import DemoPlan, run_demo

    settings = load_settings(None)
    configure_logging(settings.logging.model_copy(update={"level": "WARNING", "json_format": False}))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: keep file paths and findings on one line each
    started = time.perf_counter()
    ok = run_demo(out.resolve(), DemoPlan.quick() if quick else DemoPlan(), console)
    console.print(f"demo {'complete' if ok else 'INCOMPLETE'} in {time.perf_counter() - started:.0f} s; "
                  f"results under {out / 'destination'}")
    if not ok:
        raise typer.Exit(1)
