"""A worker applies the model card's trust decisions: calibrated probabilities, no call on a finding
the card does not assess, and no run at all of a model that is not deployable.

Real registry, real phantom radiograph in a real study store, the real ``StudyProcessor`` on the CPU
(no broker: ``process`` is what the Celery task calls).
"""

from __future__ import annotations

import json
import shutil
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch
from typer.testing import CliRunner
from workers_support import phantoms

from config.settings import load_settings
from models.calibration import Calibration
from models.card import ModelCard, OutputSpec
from models.command import models_app
from models.finetune import FinetuneConfig, FinetuneResult, build_network, save_model
from models.registry import register
from models.tasks import task_spec
from node.messages import DispatchMessage, JobState, ResultKind, SeriesRef
from node.worklist import parse_findings
from pretrain.backbones import Encoder
from workers.series import select_series
from workers.study import StudyProcessor

TASK = "cxr-abnormality"
REASON = "validation AUC 0.61 < gate 0.70"
CALIBRATION = Calibration(method="platt", slope=2.0, intercept=-1.0, ece_before=0.2, ece_after=0.05)


def _outputs() -> list[OutputSpec]:
    """"any" calibrated and called at 0.3, "nodule" below its gate, the rest called at 0.5 uncalibrated."""
    outputs = []
    for finding in task_spec(TASK).findings:
        if finding.name == "any":
            outputs.append(OutputSpec(name="any", concept=finding.concept, calibration=CALIBRATION, threshold=0.3,
                                      threshold_rule="test", assessed=True))
        elif finding.name == "nodule":
            outputs.append(OutputSpec(name="nodule", concept=finding.concept, threshold=0.4, threshold_rule="test",
                                      validation_auc=0.61, assessed=False, not_assessed_reason=REASON))
        else:
            outputs.append(OutputSpec(name=finding.name, concept=finding.concept, threshold=0.5,
                                      threshold_rule="test", assessed=True))
    return outputs


def _register(models_dir: Path, version: str, best_metric: float) -> ModelCard:
    """A seeded random-weight radiograph model, saved and registered as finetuning does, with the
    default gates applied to ``best_metric``."""
    spec = task_spec(TASK)
    config = FinetuneConfig(input=spec.input.model_copy(update={"size": 32}))
    torch.manual_seed(0)
    network = build_network(spec, Encoder(config.encoder_spec(spec)), config)
    result = FinetuneResult(network, best_metric, 0, 0, [], _outputs(), 0.0)
    folder = models_dir.parent / "staging" / version
    card = save_model(folder, spec, result, config, name=TASK, version=version, training={}, encoder_source={})
    register(models_dir, folder)
    return card


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, DispatchMessage]:
    """One phantom radiograph study in a study store, and the job that dispatches it."""
    manifest = phantoms(tmp_path / "phantoms", ("cxr",))
    (record,) = manifest.studies
    store = tmp_path / "node" / "store"
    instances = []
    for relative in record.instances:
        ds = pydicom.dcmread(manifest.out_dir / relative, stop_before_pixels=True)
        target = Path(record.study_uid) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        (store / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.out_dir / relative, store / target)
        instances.append(str(target))
    job = DispatchMessage(job_id="job-1", study_uid=record.study_uid, version=1, pipeline=TASK, priority="routine",
                          series=[SeriesRef(series_uid=record.series_uid, modality=record.modality,
                                            instances=instances)], completed_at=1_723_456_789.0)
    return store, job


def test_a_deployable_model_reports_calibrated_probabilities_and_no_call_below_the_gate(
        tmp_path: Path, study: tuple[Path, DispatchMessage]) -> None:
    store, job = study
    models_dir = tmp_path / "models"
    card = _register(models_dir, "1", best_metric=0.85)
    assert card.deployable and card.deployability == "validation mean study AUC 0.85 >= gate 0.70"
    processor = StudyProcessor(load_settings(None, node={"data_dir": tmp_path / "node"},
                                             workers={"models_dir": models_dir, "device": "cpu"}))
    report = processor.process(job)
    assert report.state == JobState.DONE, report.reason

    model = processor.models().get(TASK)
    raw = model.probabilities(select_series(store, job.series, card.applies_to)).numpy().max(axis=0)
    findings = report.findings
    called = findings["any"]
    assert not isinstance(called, float)
    assert called.probability == pytest.approx(float(CALIBRATION.apply(raw[0])), abs=1e-4)
    assert called.probability != pytest.approx(float(raw[0]), abs=1e-3)
    assert called.present == (CALIBRATION.apply(raw[0]) >= 0.3) and called.threshold == 0.3 and called.assessed
    skipped = findings["nodule"]
    assert not isinstance(skipped, float)
    assert (skipped.present, skipped.threshold, skipped.assessed, skipped.reason) == (None, None, False, REASON)
    assert skipped.probability == pytest.approx(float(raw[1]), abs=1e-4)  # identity calibration

    # The SR the worker stored: a probability for the nodule, but no present/absent.
    (sr_file,) = [f for f in report.results if f.kind == ResultKind.SR]
    sr = hd.sr.srread(BytesIO((store / sr_file.path).read_bytes()))
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    assert groups["nodule"].get_qualitative_evaluations() == []
    assert len(groups["any"].get_qualitative_evaluations()) == 1

    # The card's figures travel with the report for the study page, and the radiograph is the key image
    # of every finding, in the percentile mapping (no CT window).
    assert report.model is not None
    assert (report.model.name, report.model.version, report.model.metric, report.model.value, report.model.gate) == (
        TASK, "1", card.validation["metric"], 0.85, 0.70)
    summaries = {o.name: o for o in report.model.outputs}
    assert (summaries["any"].threshold, summaries["any"].ece_before, summaries["any"].ece_after) == (0.3, 0.2, 0.05)
    assert (summaries["nodule"].assessed, summaries["nodule"].threshold, summaries["nodule"].validation_auc) == (
        False, None, 0.61)
    (key,) = report.key_images
    (image,) = job.series[0].instances
    assert (key.sop_uid, key.frame, key.window) == (Path(image).stem, 1, None)
    assert key.findings == [f.name for f in card.outputs]

    # How the node shows it (worklist, status, demo): the call with its threshold, or why there is none.
    shown = {f.name: f.text() for f in parse_findings(json.dumps(report.model_dump(mode="json")["findings"]))}
    call = "PRESENT" if called.present else "ABSENT"
    assert shown["any"] == f"any {called.probability:.2f} (threshold 0.30) {call}"
    assert shown["nodule"] == f"nodule {skipped.probability:.2f} not assessed ({REASON})"


def test_a_model_below_its_gate_registers_is_listed_as_not_deployable_and_is_refused(
        tmp_path: Path, study: tuple[Path, DispatchMessage]) -> None:
    _, job = study
    models_dir = tmp_path / "models"
    _register(models_dir, "1", best_metric=0.85)
    held = _register(models_dir, "2", best_metric=0.53)
    reason = "validation mean study AUC 0.53 < gate 0.70"
    assert not held.deployable and held.deployability == reason

    listed = CliRunner(env={"COLUMNS": "400"}).invoke(models_app, ["list", "--models-dir", str(models_dir)])
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[2].strip(): line for line in listed.output.splitlines() if line.count("│") > 3}
    assert f"no: {reason}" in rows["2"] and "│ yes" in rows["1"]

    processor = StudyProcessor(load_settings(None, node={"data_dir": tmp_path / "node"},
                                             workers={"models_dir": models_dir, "device": "cpu"}))
    report = processor.process(job)
    assert report.state == JobState.NOT_APPLICABLE
    assert report.reason == f"model {TASK}@2 is not deployable: {reason}"
    assert report.results == [] and processor.models().loaded == {}  # refused before its weights were loaded
