"""``pacsnode archive pull`` against Orthanc as the PACS: C-FIND, C-MOVE and C-GET over loopback,
de-identification before anything is written, the ledger, failures counted, pacing honoured, and
the pulled archive going through ``pretrain index``, ``prepare`` and ``train``.

Orthanc holds phantom studies with every identifier a real study carries, plus what the profile
must take out: a private tag in every instance, one patient with two studies, and a copy of an
image flagged as having burned-in annotation.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, wait_until
from orthanc_support import ORTHANC_AET, Orthanc, requires_orthanc, run_orthanc
from typer.testing import CliRunner

from node.archive.deid import Deidentifier
from node.archive.ledger import PullLedger
from node.archive.pacing import RateCap, TimeWindow
from node.archive.pull import Peer, Puller, PullOptions, PullReport
from node.synth import generate
from tests.pretrain_support import write_recipe

pytestmark = requires_orthanc
OUR_AET = "PACSNODE-ARCH"
BROKEN_AET = "BROKEN-ARCH"  # Orthanc knows it, at a port where nobody listens: its C-MOVEs fail
SECRET = b"site secret for the tests, 32 by"
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass
class Source:
    """What Orthanc holds: the instances (SOP UID -> source dataset) and those that must not come in."""

    orthanc: Orthanc
    instances: dict[str, pydicom.Dataset]
    burned_in: set[str]

    @property
    def expected(self) -> dict[str, pydicom.Dataset]:
        return {uid: ds for uid, ds in self.instances.items() if uid not in self.burned_in}

    def identifying_values(self) -> set[bytes]:
        values: set[bytes] = set()
        for ds in self.instances.values():
            for keyword in IDENTIFYING:
                if ds.get(keyword):
                    values.add(str(ds.get(keyword)).encode())
        return values


def _sources(folder: Path) -> list[pydicom.Dataset]:
    """Phantom studies as a PACS would hold them, with what the profile must remove."""
    generate(folder, studies=2, kinds="cxr,ct-head", seed=7, ct_slices=3, ct_size=64, cxr_size=64)
    datasets = [pydicom.dcmread(path) for path in sorted((folder / "dicom").rglob("*.dcm"))]
    radiographs = sorted({ds.StudyInstanceUID for ds in datasets if ds.Modality == "DX"})
    first = next(ds for ds in datasets if ds.StudyInstanceUID == radiographs[0])
    for ds in datasets:
        if ds.StudyInstanceUID == radiographs[1]:  # the same patient's second study
            ds.PatientID, ds.PatientName, ds.PatientBirthDate = first.PatientID, first.PatientName, \
                first.PatientBirthDate
        block = ds.private_block(0x0009, "ACME IMAGING", create=True)
        block.add_new(0x01, "LO", "PRIVATE-MARK-" + ds.PatientID)
    burned = copy.deepcopy(first)
    burned.SOPInstanceUID = pydicom.uid.generate_uid()
    burned.BurnedInAnnotation = "YES"
    return [*datasets, burned]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    folder = tmp_path_factory.mktemp("pacs")
    datasets = _sources(folder / "phantoms")
    with run_orthanc(folder / "orthanc", {"archive": OUR_AET, "broken": BROKEN_AET},
                     DicomCheckCalledAet=True) as orthanc:
        for ds in datasets:
            path = folder / "upload.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert orthanc.upload(path)["Status"] == "Success"
        yield Source(orthanc, {ds.SOPInstanceUID: ds for ds in datasets},
                     {ds.SOPInstanceUID for ds in datasets if ds.get("BurnedInAnnotation") == "YES"})


def _pull(source: Source, out: Path, retrieve: str = "move", ae_title: str = OUR_AET, called: str = ORTHANC_AET,
          rate: RateCap | None = None, **options: object) -> tuple[PullReport, Puller]:
    """One pull in this process, as the CLI runs it."""
    peer = Peer(called, "127.0.0.1", source.orthanc.dicom_port)
    port = source.orthanc.peers["archive"] if ae_title == OUR_AET else free_port()
    pull_options = PullOptions(source=peer, out=out, ae_title=ae_title, port=port,
                               retrieve="move" if retrieve == "move" else "get", **options)  # type: ignore[arg-type]
    with PullLedger(out / ".pull" / "ledger.sqlite") as ledger:
        puller = Puller(pull_options, Deidentifier(SECRET), ledger, rate)
        return puller.run(), puller


def _files(out: Path) -> dict[str, pydicom.Dataset]:
    """The archive's instances by (pseudonymous) SOP Instance UID."""
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in out.rglob("*.dcm"))}


def _leaks(folder: Path, values: set[bytes]) -> list[tuple[str, bytes]]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found.extend((str(path.relative_to(folder)), v) for v in values if v in content)
        found.extend((str(path.relative_to(folder)), v) for v in values if v in str(path).encode())
    return found


@pytest.fixture(scope="module")
def moved(source: Source, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PullReport, Puller]:
    out = tmp_path_factory.mktemp("moved")
    report, puller = _pull(source, out)
    return out, report, puller


def test_a_pull_lands_every_instance_de_identified(source: Source, moved: tuple[Path, PullReport, Puller],
                                                  tmp_path: Path) -> None:
    out, report, puller = moved
    next(iter(source.instances.values())).save_as(tmp_path / "original.dcm", enforce_file_format=True)
    assert len(_leaks(tmp_path, source.identifying_values())) >= len(IDENTIFYING)  # the check can see a leak
    deid = Deidentifier(SECRET)
    assert not report.failures and report.studies_found == 4 and report.studies_pulled == 4
    files = _files(out)
    assert set(files) == {deid.uid(uid) for uid in source.expected}
    assert puller.writer.left_out == {"burned-in-annotation": 1}
    for uid, original in source.expected.items():
        pulled = files[deid.uid(uid)]
        assert pulled.PatientIdentityRemoved == "YES" and pulled.PatientID.startswith("PSN")
        assert pulled.StudyInstanceUID == deid.uid(original.StudyInstanceUID)
        assert pulled.pixel_array.tobytes() == original.pixel_array.tobytes()
        assert not any(element.tag.is_private for element in pulled)
        # Dates move back by whole days, the same for every date of the patient.
        shift = datetime.strptime(original.StudyDate, "%Y%m%d") - datetime.strptime(pulled.StudyDate, "%Y%m%d")
        assert timedelta(days=61) <= shift <= timedelta(days=731)
    assert _leaks(out, source.identifying_values() | {b"PRIVATE-MARK"}) == []


def test_the_same_patient_gets_the_same_pseudonym_in_every_pull(source: Source, moved: tuple[Path, PullReport, Puller],
                                                                tmp_path: Path) -> None:
    out, _, _ = moved
    report, _ = _pull(source, tmp_path / "got", retrieve="get")  # another pull, another retrieval mode
    assert not report.failures
    first, second = _files(out), _files(tmp_path / "got")
    assert set(first) == set(second)
    assert all(first[uid].PatientID == second[uid].PatientID for uid in first)
    by_patient: dict[str, set[str]] = {}
    for uid, original in source.expected.items():
        by_patient.setdefault(original.PatientID, set()).add(first[Deidentifier(SECRET).uid(uid)].PatientID)
    assert all(len(pseudonyms) == 1 for pseudonyms in by_patient.values())
    assert len({next(iter(p)) for p in by_patient.values()}) == len(by_patient) >= 2  # distinct patients stay apart
    two_studies = next(pid for pid in by_patient if len({ds.StudyInstanceUID for ds in source.expected.values()
                                                          if ds.PatientID == pid}) == 2)
    shifts = {(datetime.strptime(ds.StudyDate, "%Y%m%d")
               - datetime.strptime(first[Deidentifier(SECRET).uid(uid)].StudyDate, "%Y%m%d")).days
              for uid, ds in source.expected.items() if ds.PatientID == two_studies}
    assert len(shifts) == 1  # both studies of that patient moved by the same days: their interval survives


def test_a_second_pull_transfers_nothing(source: Source, moved: tuple[Path, PullReport, Puller]) -> None:
    out, _, _ = moved
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    report, puller = _pull(source, out)
    assert report.studies_complete == report.studies_found == 4
    assert report.series_pulled == 0 and puller.writer.written == 0 and not report.failures
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == before


def test_refused_association_and_failed_c_move_are_counted(source: Source, tmp_path: Path) -> None:
    refused, _ = _pull(source, tmp_path / "refused", called="NOT-THE-PACS")
    assert sum(refused.failures.values()) == 1, refused.failures
    assert next(iter(refused.failures)).startswith("query: association rejected"), refused.failures
    report, puller = _pull(source, tmp_path / "broken", ae_title=BROKEN_AET)
    # Every series was tried and counted: the run went on after the first failed C-MOVE.
    assert report.studies_found == 4 and sum(report.failures.values()) == 4 and report.series_pulled == 0, \
        report.failures
    assert all(reason.startswith("C-MOVE 0x") for reason in report.failures), report.failures
    with PullLedger(tmp_path / "broken" / ".pull" / "ledger.sqlite") as ledger:
        assert ledger.series_count() == 0  # nothing recorded: the next run fetches it all
    assert puller.writer.written == 0


def test_date_range_modalities_and_max_studies_select_what_is_pulled(source: Source, tmp_path: Path) -> None:
    study_dates = sorted({ds.StudyDate for ds in source.instances.values()})
    nothing, _ = _pull(source, tmp_path / "future", since=date(2100, 1, 1))
    assert nothing.studies_found == 0 and not nothing.failures
    first_day = datetime.strptime(study_dates[0], "%Y%m%d").date()
    early, _ = _pull(source, tmp_path / "early", until=first_day)
    expected = {ds.StudyInstanceUID for ds in source.instances.values() if ds.StudyDate <= study_dates[0]}
    assert early.studies_found == len(expected) and early.studies_pulled == len(expected)
    ct, _ = _pull(source, tmp_path / "ct", modalities=("CT",))
    assert ct.studies_pulled == len({ds.StudyInstanceUID for ds in source.expected.values() if ds.Modality == "CT"})
    assert {ds.Modality for ds in _files(tmp_path / "ct").values()} == {"CT"}
    capped, _ = _pull(source, tmp_path / "capped", max_studies=1)
    assert capped.studies_pulled == 1 and capped.studies_found == 4


def test_the_rate_cap_is_honoured(source: Source, tmp_path: Path) -> None:
    cap = RateCap(6.0)
    started = time.monotonic()
    report, puller = _pull(source, tmp_path / "slow", retrieve="get", rate=cap, concurrency=2)
    elapsed = time.monotonic() - started
    written = puller.writer.written
    assert not report.failures and written == len(source.expected)
    assert elapsed >= (written - 1) / cap.per_second * 0.95, (written, elapsed)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "node.cli", "archive", "pull", *args]


def _pull_process(source: Source, out: Path, secret: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _cli("--from", f"{ORTHANC_AET}@127.0.0.1:{source.orthanc.dicom_port}", "--out", str(out),
             "--secret-file", str(secret), "--ae-title", OUR_AET, "--port", str(source.orthanc.peers["archive"]),
             *extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "160"})


def test_a_pull_stopped_half_way_resumes(source: Source, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    out = tmp_path / "archive"
    process = _pull_process(source, out, secret, "--rate", "2", "--concurrency", "1")
    assert wait_until(lambda: len(list(out.rglob("*.dcm"))) >= 2, timeout=60)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1 and "stopped before the end" in output, output
    partial = len(list(out.rglob("*.dcm")))
    assert 2 <= partial < len(source.expected)
    resumed = _pull_process(source, out, secret)
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output
    assert set(_files(out)) == {Deidentifier(SECRET).uid(uid) for uid in source.expected}
    assert not list(out.rglob("*.tmp"))


def test_outside_its_window_a_pull_waits(source: Source, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    later = datetime.now() + timedelta(hours=2)
    window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"
    out = tmp_path / "archive"
    process = _pull_process(source, out, secret, "--window", window)
    time.sleep(6)
    assert process.poll() is None and not list(out.rglob("*.dcm"))
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 1 and f"outside {window}" in output, output


def test_time_window_rules() -> None:
    night = TimeWindow.parse("19:00-07:00")
    assert night.is_open(datetime(2026, 1, 1, 23, 0)) and night.is_open(datetime(2026, 1, 1, 6, 59))
    assert not night.is_open(datetime(2026, 1, 1, 7, 0)) and not night.is_open(datetime(2026, 1, 1, 12, 0))
    assert night.opens_in(datetime(2026, 1, 1, 18, 30)) == 1800
    assert night.opens_in(datetime(2026, 1, 1, 20, 0)) == 0
    day = TimeWindow.parse("08:00-17:30")
    assert day.opens_in(datetime(2026, 1, 1, 18, 0)) == 14 * 3600
    for bad in ("7-19", "25:00-07:00", "19:00-19:00"):
        with pytest.raises(ValueError, match="--window"):
            TimeWindow.parse(bad)


def test_rate_cap_spaces_images_out() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    cap = RateCap(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(9):
        cap.take()
    assert now[0] == pytest.approx(2.0)  # the first image at once, then one every 0.25 s
    now[0] += 10.0  # idle: at most one second's worth may then pass at once
    before = len(slept)
    for _ in range(4):
        cap.take()
    assert len(slept) == before


def test_the_pulled_archive_indexes_prepares_and_trains(source: Source, moved: tuple[Path, PullReport, Puller],
                                                         tmp_path: Path) -> None:
    from pretrain.command import app

    out, _, _ = moved
    runner = CliRunner()
    index = tmp_path / "index.sqlite"
    assert runner.invoke(app, ["index", "--archive", str(out), "--out", str(index), "--workers", "1"]).exit_code == 0
    shards = tmp_path / "shards"
    prepared = runner.invoke(app, ["prepare", "--index", str(index), "--out", str(shards), "--size", "64",
                                   "--slice-stride", "1", "--workers", "1"])
    assert prepared.exit_code == 0, prepared.output
    trained = runner.invoke(app, ["train", "--shards", str(shards), "--config", str(write_recipe(tmp_path / "r.yaml")),
                                  "--out", str(tmp_path / "run"), "--max-steps", "2"])
    assert trained.exit_code == 0 and "trained 2 step(s)" in trained.output, trained.output
    assert _leaks(tmp_path, source.identifying_values()) == []
