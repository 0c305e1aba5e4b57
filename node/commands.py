"""The node's verbs of ``pacsnode``: serve, config, status, send, purge.

Heavy imports stay inside the functions so that ``pacsnode --help`` stays fast.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from pydantic import ValidationError

from config.settings import Settings, load_settings

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="settings file (default: shipped defaults)")]


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    """Load settings or exit with a message naming the bad key."""
    try:
        return load_settings(config, **overrides)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        typer.echo("invalid settings:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from exc


def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="DICOM port (default: node.port)")] = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="called AE title")] = None,
    store: Annotated[Path | None, typer.Option(help="study store folder")] = None,
    worker: Annotated[bool | None, typer.Option("--worker/--no-worker", help="run the embedded worker")] = None,
) -> None:
    """Run the node: DICOM SCP, study assembly, routing, dispatch, metrics."""
    node: dict[str, Any] = {}
    if port is not None:
        node["port"] = port
    if ae_title is not None:
        node["ae_title"] = ae_title
    if store is not None:
        node["store_dir"] = store
    settings = settings_or_exit(config, **({"node": node} if node else {}))
    from node.logs import configure_logging
    from node.service import Node

    configure_logging(settings.logging)
    from node.preflight import settings_warnings

    log = structlog.get_logger("pacsnode.config")
    for warning in settings_warnings(settings):
        log.warning("configuration", warning=warning)
    try:
        Node(settings, config_file=config, with_worker=worker).run_forever()
    except OSError as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


config_app = typer.Typer(no_args_is_help=True)


@config_app.callback()
def config_group() -> None:
    """Inspect the settings."""


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the settings and print the effective values (secrets masked)."""
    settings = settings_or_exit(config)
    import yaml

    typer.echo(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True), sort_keys=False))
    _warn(settings)


def _warn(settings: Settings) -> None:
    """The configuration's surprises (``node.preflight``), on stderr."""
    from node.preflight import settings_warnings

    for warning in settings_warnings(settings):
        typer.echo(f"warning: {warning}", err=True)


def status(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="only studies in this state")] = None,
    date_from: Annotated[str | None, typer.Option("--from", help="received on or after this day (YYYY-MM-DD)")] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="received on or before this day (YYYY-MM-DD)")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 50,
) -> None:
    """Studies with their states, findings and export status, from the node's index.

    The same query as the HTTP worklist (``/api/studies``): dates are the day the node received
    the study, in local time, both ends inclusive; newest received first.
    """
    settings = settings_or_exit(config)
    from rich.console import Console
    from rich.table import Table

    from node.embedded_worker import read_worker_health
    from node.index import StudyIndex
    from node.worklist import QueryError, StudyQuery, Worklist, duration_text, short_time

    try:
        query = StudyQuery.parse(state, date_from, date_to, limit)
    except QueryError as exc:
        name = str(exc).split(":", 1)[0]
        raise typer.BadParameter(str(exc), param_hint=f"--{name}") from exc
    if not settings.node.index_path.exists():
        raise typer.BadParameter(f"no index at {settings.node.index_path}", param_hint="--config")
    worklist = Worklist(StudyIndex(settings.node.index_path))
    console = Console()
    if not console.is_terminal:
        console = Console(width=400)  # piped or redirected: one line per study, UIDs never cut
    counts = worklist.counts_by_state()
    exports = {k: v for k, v in worklist.export_counts().items() if v}
    console.print("Studies by state: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    console.print("Exports by state: " + (", ".join(f"{k}={v}" for k, v in sorted(exports.items())) or "none"))
    worker = read_worker_health(settings.node.data_dir)
    if worker is not None:
        console.print(worker.summary(), style="bold red" if worker.failing else None, markup=False)
    table = Table("Study Instance UID", "v", "state", "images", "MB", "pipelines", "findings", "export",
                  "received", "result", "took", "reason")
    table.columns[0].overflow = "fold"  # a narrow terminal wraps a UID rather than truncating it
    for study in worklist.studies(query):
        table.add_row(study.study_uid, str(study.version), f"URGENT {study.state}" if study.urgent else study.state,
                      str(study.image_count),
                      f"{study.bytes / 1e6:.1f}", ", ".join(f"{p.pipeline}:{p.state}" for p in study.pipelines),
                      study.findings_text(), study.exports_text(), short_time(study.received_at),
                      short_time(study.result_at), duration_text(study.processing_s), study.reason,
                      style="bold red" if study.urgent else None)
    console.print(table)


def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the receiver")],
    aec: Annotated[str, typer.Option(help="called AE title")] = "PACSNODE",
    aet: Annotated[str, typer.Option(help="our calling AE title")] = "PACSNODE-SCU",
) -> None:
    """Send DICOM files (C-STORE), exactly as they are on disk, with a progress bar."""
    host, _, port_text = to.rpartition(":")
    if not host or not port_text.isdigit():
        raise typer.BadParameter("expected HOST:PORT", param_hint="--to")
    if not 1 <= int(port_text) <= 65535:
        raise typer.BadParameter(f"port {port_text} is not in 1-65535", param_hint="--to")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [IPv6]:PORT
    try:
        socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise typer.BadParameter(f"cannot resolve host {host!r}: {exc}", param_hint="--to") from exc
    from rich.progress import Progress

    from node.send import SendReport, scan, send_files

    report = SendReport()
    outgoing = scan(paths, report)
    with Progress() as progress:
        bar = progress.add_task("sending", total=len(outgoing))
        result = send_files(outgoing, host, int(port_text), aec, aet, progress=lambda _: progress.advance(bar))
    result.skipped.update(report.skipped)
    for path, why in {**result.skipped, **result.failed}.items():
        typer.echo(f"{path}: {why}", err=True)
    typer.echo(f"sent {result.sent}, failed {len(result.failed)}, skipped {len(result.skipped)}")
    if result.failed:
        raise typer.Exit(1)


def purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go, delete nothing")] = False,
) -> None:
    """Apply the retention policy now: finished studies by age and disk use."""
    settings = settings_or_exit(config)
    from node.index import StudyIndex
    from node.retention import apply_purge, plan_purge
    from node.store import StudyStore

    if not settings.node.index_path.exists():
        raise typer.BadParameter(f"no index at {settings.node.index_path}", param_hint="--config")
    index = StudyIndex(settings.node.index_path)
    store = StudyStore(settings.node.store_path)
    items = plan_purge(index, store, settings.retention, time.time())
    for item in items:
        typer.echo(f"{item.study_uid}\t{item.state}\t{item.bytes / 1e6:.1f} MB\t{item.why}")
    if dry_run:
        typer.echo(f"dry run: {len(items)} studies would be purged")
        return
    purged, freed = apply_purge(index, store, items)
    typer.echo(f"purged {purged} studies, freed {freed / 1e6:.1f} MB")
