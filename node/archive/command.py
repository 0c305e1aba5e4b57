"""``pacsnode archive pull|deid``: the pretraining archive from a PACS or from an exported folder.

Thin shells over ``node.archive.pull`` and ``node.archive.deid``: flags become options, bad flags
one-line messages, Ctrl-C a clean stop (the next run resumes), and the run ends with counts by
reason. Exit status: 0 when nothing failed, 1 when something was counted as failed or the run was
stopped, 2 for bad input.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar
from rich.table import Table
from rich.text import Text

from node.archive.deid import Deidentifier, DeidPolicy, SecretError, read_secret
from node.archive.ledger import PullLedger
from node.archive.pacing import RateCap, TimeWindow
from node.archive.pull import Peer, Progress, Puller, PullOptions, PullReport
from node.archive.writer import ArchiveWriter
from node.commands import ConfigOption, settings_or_exit

app = typer.Typer(help="The pretraining archive: pull it from a PACS, or de-identify an exported folder.",
                  no_args_is_help=True)
LEDGER = Path(".pull") / "ledger.sqlite"


def _fail(message: str) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {message}")
    return typer.Exit(2)


def _deidentifier(secret_file: Path, keep_secondary_capture: bool, keep_ultrasound: bool) -> Deidentifier:
    try:
        return Deidentifier(read_secret(secret_file), DeidPolicy(keep_secondary_capture, keep_ultrasound))
    except SecretError as error:
        raise _fail(str(error)) from error


def _apart_from_node(out: Path, config: Path | None) -> None:
    """Refuse an archive folder inside the node's data folder or study store: pulled studies must
    never meet the clinical store, its index or its routing."""
    node = settings_or_exit(config).node
    for clinical in (node.data_dir, node.store_path):
        if out.resolve().is_relative_to(clinical.resolve()):
            raise _fail(f"--out {out} is inside the node's {clinical}: the pretraining archive lives apart from the "
                        "clinical store")


def _counts(title: str, counts: Counter[str]) -> None:
    if counts:
        table = Table(title=title)
        table.add_column("reason")
        table.add_column("count", justify="right")
        for reason, count in counts.most_common():
            table.add_row(reason, str(count))
        Console().print(table)


class ImagesPerSecond(ProgressColumn):
    """Instances written per second so far (the bar itself counts studies)."""

    def __init__(self, writer: ArchiveWriter) -> None:
        super().__init__()
        self.writer = writer

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = self.writer.written / elapsed if elapsed > 0 else 0.0
        return Text(f"{self.writer.written:,} images, {rate:,.1f}/s", style="progress.data.speed")


SecretFile = Annotated[Path, typer.Option("--secret-file", help="The site secret (>= 16 bytes): keyed pseudonyms "
                                                                 "and UIDs. Keep it apart from the archive.")]
KeepSC = Annotated[bool, typer.Option(help="Take in secondary captures (may show burned-in names).")]
KeepUS = Annotated[bool, typer.Option(help="Take in ultrasound (may show burned-in names).")]


@app.command()
def pull(
    source: Annotated[str, typer.Option("--from", help="The PACS as AET@HOST:PORT.")],
    out: Annotated[Path, typer.Option("--out", help="The archive folder (apart from the node's study store).")],
    secret_file: SecretFile,
    ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title (the PACS must know it for C-MOVE).")]
    = "PACSNODE-ARCH",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Our storage SCP's port, for C-MOVE.")] = 11113,
    retrieve: Annotated[str, typer.Option(help="move (to our SCP) or get (on the same association).")] = "move",
    since: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First study date.")] = None,
    until: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last study date.")] = None,
    modality: Annotated[list[str] | None, typer.Option(help="Modalities to pull (repeatable; default: all).")]
    = None,
    max_studies: Annotated[int | None, typer.Option(min=1, help="Pull at most this many studies this run.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=16, help="Retrievals at once.")] = 2,
    rate: Annotated[float | None, typer.Option(min=0.1, help="At most this many images per second.")] = None,
    window: Annotated[str | None, typer.Option(help="Pull only between these local times, e.g. 19:00-07:00.")]
    = None,
    keep_secondary_capture: KeepSC = False,
    keep_ultrasound: KeepUS = False,
    config: ConfigOption = None,
) -> None:
    """Pull studies from a PACS (C-FIND, then C-MOVE or C-GET), de-identified before they touch disk.

    Resumable: what was fetched is in OUT/.pull/ledger.sqlite (keyed digests, no UIDs), so a
    second run transfers only what is new. Ctrl-C stops cleanly.
    """
    if retrieve not in ("move", "get"):
        raise _fail(f"--retrieve {retrieve!r}: move or get")
    try:
        options = PullOptions(
            source=Peer.parse(source), out=out, ae_title=ae_title, port=port,
            retrieve="move" if retrieve == "move" else "get",
            since=since.date() if since else None, until=until.date() if until else None,
            modalities=tuple(m.upper() for m in modality or ()), max_studies=max_studies, concurrency=concurrency,
            window=TimeWindow.parse(window) if window else None)
        cap = RateCap(rate) if rate else None
    except ValueError as error:
        raise _fail(str(error)) from error
    _apart_from_node(out, config)
    deid = _deidentifier(secret_file, keep_secondary_capture, keep_ultrasound)
    stop = threading.Event()

    def interrupted(signum: int, frame: FrameType | None) -> None:
        Console(stderr=True).print("stopping: finishing nothing new; the next run resumes")
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with PullLedger(out / LEDGER) as ledger:
            puller = Puller(options, deid, ledger, cap, stop)
            report = _run_with_bar(puller)
    finally:
        signal.signal(signal.SIGINT, previous)
    _summary(report, puller.writer)
    if report.failures or report.stopped:
        raise typer.Exit(1)


def _run_with_bar(puller: Puller) -> PullReport:
    with Bar(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("studies"), ImagesPerSecond(puller.writer), TimeElapsedColumn(), TextColumn("ETA"),
             TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=Console(stderr=True)) as bar:
        task = bar.add_task(f"pulling from {puller.options.source}", total=None, note="")

        def paused(note: str) -> None:
            if note and note != bar.tasks[task].fields["note"]:
                bar.console.print(f"{note} (Ctrl-C stops; the next run resumes)")
            bar.update(task, note=note)

        progress = Progress(on_total=lambda total: bar.update(task, total=total),
                            on_study=lambda: bar.advance(task), on_pause=paused)
        return puller.run(progress)


def _summary(report: PullReport, writer: ArchiveWriter) -> None:
    console = Console()
    console.print(f"studies found {report.studies_found}, already complete {report.studies_complete}, "
                  f"pulled {report.studies_pulled}; series {report.series_pulled}; images written {writer.written}"
                  + ("; stopped before the end" if report.stopped else ""))
    _counts("left out (not written)", writer.left_out)
    _counts("failed (fetched again next run)", report.failures)


def _files(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, depth first, without holding the listing in memory."""
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            yield Path(root) / name


@app.command()
def deid(
    source: Annotated[Path, typer.Argument(help="A folder of DICOM files a site exported.", exists=True,
                                           file_okay=False)],
    out: Annotated[Path, typer.Argument(help="The archive folder to write (never inside SOURCE).")],
    secret_file: SecretFile,
    keep_secondary_capture: KeepSC = False,
    keep_ultrasound: KeepUS = False,
    config: ConfigOption = None,
) -> None:
    """De-identify an exported folder into an archive folder, the same way `archive pull` does."""
    if out.resolve().is_relative_to(source.resolve()):
        raise _fail(f"{out} is inside {source}: the de-identified archive must live apart from its source")
    _apart_from_node(out, config)
    writer = ArchiveWriter(out, _deidentifier(secret_file, keep_secondary_capture, keep_ultrasound))
    unreadable: Counter[str] = Counter()
    for path in _files(source):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            unreadable[f"not readable as DICOM ({type(error).__name__})"] += 1
            continue
        writer.accept(ds)
    Console().print(f"images written {writer.written} to {out}")
    _counts("left out (not written)", writer.left_out)
    _counts("skipped", unreadable)
