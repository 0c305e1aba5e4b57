"""The worklist triages and shows: urgent positive studies first and marked, in the API and on the
page; each study's page with its key images rendered as PNG in the model's window, lesion outlines
from the SEG drawn on them, each finding's probability, threshold and call, the model card's
version and validation figures; patient names only behind authentication and never in a log.

One real node with phantom head CTs and a brain MR sent over DICOM; the reports come through the
real broker as a worker sends them, the MR's with the phantom's own SEG as its result.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dicom_factory as f
import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import make_settings, wait_until
from lifecycle_support import cli_env, run_cli, state_of
from PIL import Image
from pydicom.pixels import apply_rescale
from scipy import ndimage
from web_support import basic, dump_dom, get, get_json, screenshot
from workers_support import phantoms, study_files

from node.broker import connection
from node.index import SCHEMA, StudyIndex
from node.messages import (
    DisplayWindow,
    JobState,
    KeyImage,
    ModelSummary,
    OutputSummary,
    ReportedFinding,
    ReportMessage,
    ResultFile,
    ResultKind,
)
from node.send import SendReport, scan, send_files
from node.service import Node
from workers.reporting import publish_report

BRAIN = DisplayWindow(name="brain", centre=40, width=80)
OUTLINE = (255, 64, 64)  # node.key_image's first outline colour
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="chromium is not installed (.ci/install installs it)")


@dataclass(frozen=True)
class Scenario:
    node: Node
    bleed: str  # head CT, hemorrhage called present: urgent, though received first
    normal: str  # head CT, called absent
    mets: str  # brain MR with two metastases and their SEG
    bleed_key: Path  # the CT slice reported as the key image
    mets_key: Path  # the MR slice reported as the key image
    seg: Path  # the MR's SEG, as stored by the node

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.node.http_port}{path}"


def _summary(name: str, outputs: list[OutputSummary]) -> ModelSummary:
    return ModelSummary(name=name, version="3", metric="auc", value=0.91, gate=0.7,
                        deployability="validation mean study AUC 0.91 >= gate 0.70", outputs=outputs)


def _largest_lesion_slice(seg: hd.seg.Segmentation, sources: list[Path]) -> Path:
    areas = {p: int(seg.get_pixels_by_source_instance([p.stem], ignore_spatial_locations=True,
                                                      assert_missing_frames_are_empty=True).sum()) for p in sources}
    return max(areas, key=lambda p: areas[p])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("triage")
    manifest = phantoms(tmp / "phantoms", ("ct-head", "mr-brain"), studies=3, slices=8, size=64)
    ct = [r for r in manifest.studies if r.kind == "ct-head"]
    bleed = next(r for r in ct if r.labels.get("any") == 1)
    normal = next(r for r in ct if r.labels.get("any") == 0)
    mets = next(r for r in manifest.studies if r.kind == "mr-brain" and r.labels.get("metastasis") == 1)
    settings = make_settings(tmp / "node", logging={"level": "INFO"})
    node = Node(settings, with_worker=False)
    node.start()
    try:
        for record in (bleed, normal, mets):  # the urgent one arrives first: newest-first would list it last
            files = study_files(manifest.out_dir, record.study_uid)
            report = send_files(scan(files, SendReport()), "127.0.0.1", node.dicom_port, "PACSNODE")
            assert not report.failed and report.sent == len(files)
        uids = (bleed.study_uid, normal.study_uid, mets.study_uid)
        assert wait_until(lambda: all(state_of(node.index, u) == "queued" for u in uids), timeout=30)

        store = node.store.root
        ct_slices = sorted((store / bleed.study_uid).rglob("*.dcm"))
        bleeding = {s.sop_uid for s in manifest.slices if s.study_uid == bleed.study_uid and s.labels.get("any") == 1}
        bleed_key = next(p for p in ct_slices if p.stem in bleeding)
        seg_source = manifest.out_dir / str(mets.seg_path)
        seg_ds = pydicom.dcmread(seg_source)
        seg_path = store / mets.study_uid / str(seg_ds.SeriesInstanceUID) / f"{seg_ds.SOPInstanceUID}.dcm"
        seg_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seg_source, seg_path)
        mr_slices = [p for p in sorted((store / mets.study_uid).rglob("*.dcm")) if p != seg_path]
        mets_key = _largest_lesion_slice(hd.seg.segread(seg_path), mr_slices)

        ct_outputs = [OutputSummary(name="any", assessed=True, threshold=0.41, validation_auc=0.93, positives=40,
                                    negatives=60, ece_before=0.12, ece_after=0.03),
                      OutputSummary(name="epidural", assessed=False, validation_auc=0.58)]
        jobs = {u: node.index.jobs_of(u)[0].job_id for u in uids}
        with connection(settings) as conn:
            for uid, probability in ((bleed.study_uid, 0.93), (normal.study_uid, 0.05)):
                key = bleed_key if uid == bleed.study_uid else min((store / uid).rglob("*.dcm"))
                publish_report(conn, settings, ReportMessage(
                    job_id=jobs[uid], state=JobState.DONE, reason="ct-hemorrhage@3",
                    findings={"any": ReportedFinding(probability=probability, present=probability >= 0.41,
                                                     threshold=0.41),
                              "epidural": ReportedFinding(probability=0.2, present=None, assessed=False,
                                                          reason="validation AUC 0.58 < gate 0.70")},
                    model=_summary("ct-hemorrhage", ct_outputs),
                    key_images=[KeyImage(sop_uid=key.stem, findings=["any"], window=BRAIN)]))
            publish_report(conn, settings, ReportMessage(
                job_id=jobs[mets.study_uid], state=JobState.DONE, reason="mr-metastasis@3",
                findings={"metastasis": ReportedFinding(probability=0.88, present=True, threshold=0.5, lesions=2,
                                                        volume_mm3=10019.5)},
                model=_summary("mr-metastasis", [OutputSummary(name="metastasis", assessed=True, threshold=0.5)]),
                key_images=[KeyImage(sop_uid=mets_key.stem, findings=["metastasis"])],
                results=[ResultFile(path=str(seg_path.relative_to(store)), sop_uid=seg_path.stem,
                                    sop_class_uid=str(seg_ds.SOPClassUID), kind=ResultKind.SEG)]))
        assert wait_until(lambda: all(state_of(node.index, u) == "done" for u in uids), timeout=20)
        yield Scenario(node, *uids, bleed_key=bleed_key, mets_key=mets_key, seg=seg_path)
    finally:
        node.stop()


def test_the_urgent_positive_study_comes_first_in_the_api_whatever_the_sort(scenario: Scenario) -> None:
    status, listing = get_json(scenario.url("/api/studies"))
    assert status == 200
    assert [s["study_uid"] for s in listing["studies"]] == [scenario.bleed, scenario.mets, scenario.normal]
    assert [s["urgent"] for s in listing["studies"]] == [True, False, False]
    assert listing["query"]["urgent_first"] is True
    first = listing["studies"][0]
    assert first["accession_number"] and "patient_name" not in first  # no authentication: no names
    (pipeline,) = first["pipelines"]
    assert pipeline["model"]["version"] == "3" and pipeline["key_images"][0]["window"]["name"] == "brain"
    for query in ("sort=received&order=asc", "sort=state", "sort=description&order=asc", "sort=images"):
        _, sorted_listing = get_json(scenario.url(f"/api/studies?{query}"))
        assert sorted_listing["studies"][0]["study_uid"] == scenario.bleed, query
    _, oldest_first = get_json(scenario.url("/api/studies?sort=received&order=asc"))
    assert [s["study_uid"] for s in oldest_first["studies"]][1:] == [scenario.normal, scenario.mets]
    status, error = get_json(scenario.url("/api/studies?sort=PatientName"))
    assert status == 400 and error["error"].startswith("sort: expected one of")


def test_status_lists_the_urgent_study_first_and_marked(scenario: Scenario) -> None:
    listing = run_cli("status", env=cli_env(scenario.node.settings))
    assert listing.returncode == 0, listing.stderr
    lines = [line for line in listing.stdout.splitlines() if "2.25." in line]
    assert scenario.bleed in lines[0] and "URGENT done" in lines[0]
    assert sum("URGENT" in line for line in lines) == 1


def test_a_ct_key_image_is_the_slice_in_the_brain_window(scenario: Scenario) -> None:
    status, headers, body = get(scenario.url(f"/studies/{scenario.bleed}/key-images/ct-hemorrhage/0.png"))
    assert status == 200 and headers["Content-Type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    ds = pydicom.dcmread(scenario.bleed_key)
    hu = apply_rescale(ds.pixel_array, ds).astype(np.float64)
    expected = (np.clip((hu - 0.0) / 80.0, 0, 1) * 255).round().astype(np.uint8)
    factor = shown.shape[0] // expected.shape[0]
    assert factor >= 2 and shown.shape[:2] == (expected.shape[0] * factor, expected.shape[1] * factor)
    assert np.array_equal(shown[::factor, ::factor, 0], expected)
    assert np.array_equal(shown[..., 0], shown[..., 2])  # grey: no outline on a classification's slice
    assert 0 < (expected == 255).mean() < 0.5  # the brain window saturates bone, not the brain

    assert get(scenario.url(f"/studies/{scenario.bleed}/key-images/ct-hemorrhage/1.png"))[0] == 404
    assert get(scenario.url(f"/studies/{scenario.bleed}/key-images/mr-metastasis/0.png"))[0] == 404
    assert get(scenario.url("/studies/1.2.3/key-images/ct-hemorrhage/0.png"))[0] == 404


def test_an_mr_key_image_has_the_seg_outline_of_its_lesions(scenario: Scenario) -> None:
    status, _, body = get(scenario.url(f"/studies/{scenario.mets}/key-images/mr-metastasis/0.png"))
    assert status == 200
    shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    mask = hd.seg.segread(scenario.seg).get_pixels_by_source_instance(
        [scenario.mets_key.stem], ignore_spatial_locations=True, assert_missing_frames_are_empty=True)[0, ..., 0] > 0
    outline = mask & ~ndimage.binary_erosion(mask)
    factor = shown.shape[0] // mask.shape[0]
    red = np.all(shown[::factor, ::factor] == OUTLINE, axis=-1)
    assert outline.sum() > 4 and np.array_equal(red, outline)


@needs_chromium
def test_the_page_puts_the_urgent_study_first_and_renders_its_key_images(scenario: Scenario,
                                                                         tmp_path: Path) -> None:
    dom = dump_dom(scenario.url("/"), tmp_path / "profile")
    rows = re.findall(r'<tr data-study-uid="([0-9.]+)" data-state="[a-z_]+" data-urgent="([01])"', dom)
    assert rows == [(scenario.bleed, "1"), (scenario.mets, "0"), (scenario.normal, "0")]
    assert '<span class="badge urgent">URGENT</span>' in dom and '<meta http-equiv="refresh" content="30">' in dom
    assert re.search(r'<span class="call present">any 0\.93 \(thr 0\.41\) PRESENT</span>', dom)
    assert 'href="/?limit=200&amp;sort=received&amp;order=asc"' in dom  # the sorted column's link reverses it
    assert "PHANTOM" not in dom and "PH0001" not in dom  # no names without authentication

    study = dump_dom(scenario.url(f"/studies/{scenario.mets}"), tmp_path / "profile")
    assert f'src="/studies/{scenario.mets}/key-images/mr-metastasis/0.png"' in study
    assert "mr-metastasis version 3" in study and "0.910" in study and "(gate 0.70)" in study
    assert "lesion outlines from the SEG" in study
    ct_page = dump_dom(scenario.url(f"/studies/{scenario.bleed}"), tmp_path / "profile")
    assert "brain window 40/80 HU" in ct_page and "0.12" in ct_page and "0.03" in ct_page  # ECE raw -> calibrated
    assert '<span class="call na">not assessed</span>' in ct_page

    # As Chromium draws it: the SEG outline's colour is on the screen, so the PNG loaded under the CSP.
    shot = screenshot(scenario.url(f"/studies/{scenario.mets}"), tmp_path / "profile", tmp_path / "mets.png")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert np.all(pixels == OUTLINE, axis=1).sum() > 100
    shutil.copyfile(shot, scenario.node.settings.node.data_dir / "study-page.png")
    screenshot(scenario.url("/"), tmp_path / "profile", scenario.node.settings.node.data_dir / "worklist.png")


def test_patient_names_only_behind_authentication_and_never_in_a_log(start_node, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    node = start_node(http={"auth": "basic", "users": {"reader": "correct horse battery"},
                            "show_patient_name": True}, logging={"level": "DEBUG", "json": False})
    chest = f.cxr()
    f.send(chest, tmp_path / "chest", node.dicom_port)
    assert wait_until(lambda: state_of(node.index, str(chest[0].StudyInstanceUID)) is not None)
    base = f"http://127.0.0.1:{node.http_port}"
    _, listing = get_json(f"{base}/api/studies", basic("reader", "correct horse battery"))
    (entry,) = listing["studies"]
    assert entry["patient_name"] == "PHANTOM^LIFECYCLE" and entry["accession_number"] == "ACC1"
    status, _, page = get(f"{base}/", basic("reader", "correct horse battery"))
    assert status == 200 and b"PHANTOM^LIFECYCLE" in page and b"ACC1" in page
    logged = capfd.readouterr()
    audit = (node.settings.node.data_dir / "audit.log").read_text()
    for text in (logged.out, logged.err, audit):
        assert "PHANTOM" not in text and "ACC1" not in text and "LC0001" not in text


def test_show_patient_name_is_refused_without_authentication(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http.show_patient_name needs http.auth"):
        make_settings(tmp_path, http={"show_patient_name": True})


def test_an_index_from_before_triage_gains_its_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO studies(study_uid, state, created_at, last_instance_at, updated_at)"
                   " VALUES ('1.2.3', 'done', 1, 1, 1)")
        db.execute("INSERT INTO jobs(job_id, study_uid, version, pipeline, rule, priority, state, payload,"
                   " created_at, updated_at) VALUES ('j', '1.2.3', 1, 'p', 'r', 0, 'done', '{}', 1, 1)")
    index = StudyIndex(path)
    row = index.study("1.2.3")
    assert row is not None and row.urgent == 0
    with sqlite3.connect(path) as db:
        assert json.loads(db.execute("SELECT key_images FROM jobs").fetchone()[0]) == []
    StudyIndex(path)  # a second start finds them present
