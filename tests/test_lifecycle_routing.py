"""Routing: each phantom family reaches its pipeline end to end; unmatched studies are kept and
never dispatched; every condition operator, checked directly on SeriesRow objects."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
import redis
from conftest import wait_until
from lifecycle_support import queue_lengths, queued_task_ids, state_of, study
from pydantic import TypeAdapter

from config.settings import Condition, Expectation, RoutingRule, load_settings
from node.index import SeriesRow
from node.routing import condition_matches, expectation_met, route
from node.send import SendReport, scan, send_files
from node.synth import generate

CONDITION: TypeAdapter[Any] = TypeAdapter(Condition)


def series(**fields: Any) -> SeriesRow:
    base: dict[str, Any] = {
        "series_uid": "1.2.3", "study_uid": "1.2", "modality": "CT", "body_part": "HEAD",
        "sop_class_uid": f.CT_IMAGE, "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "series_description": "HEAD 5mm",
        "study_description": "CT HEAD", "series_number": 1, "rows": 512, "columns": 512,
        "slice_thickness": 5.0, "kind": "image", "instance_count": 30,
    }
    base.update(fields)
    return SeriesRow(**base)


def matches(condition: dict[str, Any], row: SeriesRow) -> bool:
    return condition_matches(CONDITION.validate_python(condition), row)


# --- operators, directly -------------------------------------------------------------------


@pytest.mark.parametrize(("condition", "row", "expected"), [
    ({"attribute": "Modality", "equals": "CT"}, series(), True),
    ({"attribute": "Modality", "equals": "ct"}, series(), True),  # case-insensitive text
    ({"attribute": "Modality", "equals": "MR"}, series(), False),
    ({"attribute": "SliceThickness", "equals": 5}, series(slice_thickness=5.0), True),  # numeric
    ({"attribute": "SliceThickness", "equals": 5}, series(slice_thickness=5.5), False),
    ({"attribute": "SliceThickness", "equals": 5}, series(slice_thickness=None), False),  # absent
    ({"attribute": "BodyPartExamined", "equals": "HEAD"}, series(body_part=""), False),
], ids=["text", "text-case", "text-other", "number", "number-other", "number-absent", "text-absent"])
def test_equals(condition: dict[str, Any], row: SeriesRow, expected: bool) -> None:
    assert matches(condition, row) is expected


@pytest.mark.parametrize(("value", "expected"), [("DX", True), ("cr", True), ("MG", False), ("", False)])
def test_in(value: str, expected: bool) -> None:
    assert matches({"attribute": "Modality", "in": ["DX", "CR"]}, series(modality=value)) is expected


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("(?i)^(HEAD|BRAIN)$", "brain", True),
    ("(?i)^(HEAD|BRAIN)$", "HEADNECK", False),  # anchored
    ("HEAD", "HEADNECK", True),  # unanchored: search
    ("^$", "", True),  # an absent value matches only a pattern that matches the empty string
    ("HEAD", "", False),
], ids=["anchored", "anchored-miss", "search", "absent-empty", "absent"])
def test_regex(pattern: str, value: str, expected: bool) -> None:
    assert matches({"attribute": "BodyPartExamined", "regex": pattern}, series(body_part=value)) is expected


@pytest.mark.parametrize(("bounds", "count", "expected"), [
    ({"min": 8}, 7, False), ({"min": 8}, 8, True), ({"max": 8}, 8, True), ({"max": 8}, 9, False),
    ({"min": 2, "max": 4}, 3, True), ({"min": 2, "max": 4}, 5, False), ({"min": 2, "max": 4}, 1, False),
])
def test_min_max_on_a_count(bounds: dict[str, float], count: int, expected: bool) -> None:
    assert matches({"attribute": "InstanceCount", **bounds}, series(instance_count=count)) is expected


def test_min_max_on_a_real_value_and_an_absent_one() -> None:
    thin = {"attribute": "SliceThickness", "max": 1.5}
    assert matches(thin, series(slice_thickness=0.625))
    assert not matches(thin, series(slice_thickness=5.0))
    assert not matches(thin, series(slice_thickness=None))  # absent never satisfies a range
    assert matches({"attribute": "Rows", "min": 256}, series(rows=512))
    assert not matches({"attribute": "Rows", "min": 256}, series(rows=None))


def test_image_type_is_multi_valued() -> None:
    row = series(image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    assert matches({"attribute": "ImageType", "equals": "LOCALIZER"}, row)
    assert matches({"attribute": "ImageType", "in": ["DERIVED", "localizer"]}, row)
    assert matches({"attribute": "ImageType", "regex": "^LOCAL"}, row)
    assert not matches({"attribute": "ImageType", "equals": "DERIVED"}, row)
    assert not matches({"attribute": "ImageType", "regex": "^PRIMARY\\\\"}, row)  # values, not the raw string
    assert not matches({"attribute": "ImageType", "equals": "ORIGINAL\\PRIMARY\\LOCALIZER"}, row)


def test_all_and_any_nest() -> None:
    head_ct = {"all": [
        {"attribute": "Modality", "equals": "CT"},
        {"any": [{"attribute": "BodyPartExamined", "in": ["HEAD", "BRAIN"]},
                 {"attribute": "StudyDescription", "regex": "(?i)head"}]},
        {"attribute": "InstanceCount", "min": 8},
    ]}
    assert matches(head_ct, series())
    assert matches(head_ct, series(body_part="", study_description="ct head w/o"))
    assert not matches(head_ct, series(body_part="CHEST", study_description="CT THORAX"))
    assert not matches(head_ct, series(modality="MR"))
    assert not matches(head_ct, series(instance_count=7))
    assert matches({"any": []}, series()) is False
    assert matches({"all": []}, series()) is True


def test_route_gives_one_route_per_pipeline_with_only_the_matching_series() -> None:
    rules = [RoutingRule.model_validate(r) for r in (
        {"name": "a", "pipeline": "p1", "match": {"attribute": "ImageType", "equals": "AXIAL"}},
        {"name": "b", "pipeline": "p1", "match": {"attribute": "Modality", "equals": "CT"}},  # same pipeline
        {"name": "c", "pipeline": "p2", "priority": "urgent", "match": {"attribute": "SliceThickness", "max": 1}},
        {"name": "d", "pipeline": "p3", "match": {"attribute": "Modality", "equals": "MR"}},
    )]
    axial = series(series_uid="1.1", slice_thickness=5.0)
    thin = series(series_uid="1.2", image_type="ORIGINAL\\PRIMARY", slice_thickness=0.625)
    routes = route(rules, [axial, thin])
    assert [(r.rule.name, [s.series_uid for s in r.series]) for r in routes] == [("a", ["1.1"]), ("c", ["1.2"])]
    assert route(rules, []) == []


def test_expectations() -> None:
    rows = [series(series_uid="1.1", series_description="T1 POST", instance_count=3),
            series(series_uid="1.2", series_description="FLAIR", instance_count=4)]
    assert expectation_met(Expectation(min_instances=7), rows)
    assert not expectation_met(Expectation(min_instances=8), rows)
    assert expectation_met(Expectation(series_descriptions=["^T1", "FLAIR"]), rows)
    assert not expectation_met(Expectation(series_descriptions=["^T1", "DWI"]), rows)


# --- end to end over DICOM ------------------------------------------------------------------


def test_each_phantom_family_goes_to_its_pipeline_and_unmatched_studies_are_never_dispatched(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    client = redis.Redis.from_url(clean_redis)
    phantoms = generate(tmp_path / "synth", 1, "cxr,ct-head,mr-brain", seed=11, ct_slices=8, mr_slices=8,
                        ct_size=64, mr_size=64, cxr_size=64)
    family = {record.kind: record.study_uid for record in phantoms.studies}
    report = SendReport()
    sent = send_files(scan([phantoms.out_dir], report), "127.0.0.1", node.dicom_port, "PACSNODE")
    assert not sent.failed and sent.sent >= 17, sent

    unmatched = {
        "ct-abdomen": f.ct_head(8, body_part="ABDOMEN"),
        "ct-head-too-few-slices": f.ct_head(7),
        "mr-knee": f.mr_brain(8, body_part="KNEE"),
        "dx-spine": f.cxr(body_part="SPINE"),
    }
    f.send([ds for datasets in unmatched.values() for ds in datasets], tmp_path / "unmatched", node.dicom_port)
    unmatched_uids = {name: datasets[0].StudyInstanceUID for name, datasets in unmatched.items()}

    expected = {"cxr": ("cxr-abnormality", 0), "ct-head": ("ct-hemorrhage", 9), "mr-brain": ("mr-metastasis", 0)}
    assert wait_until(lambda: all(state_of(node.index, uid) == "queued" for uid in family.values()), timeout=15)
    for kind, uid in family.items():
        (job,) = node.index.jobs_of(uid)
        assert (job.pipeline, job.priority) == expected[kind], kind
        assert job.job_id == f"{uid}/v1/{expected[kind][0]}"
        assert queued_task_ids(client, f"pacsnode.{job.pipeline}") == [job.job_id]
    assert queue_lengths(client, "pacsnode.ct-hemorrhage") == {"pacsnode.ct-hemorrhage": 1}  # urgent: list 0
    assert queue_lengths(client, "pacsnode.mr-metastasis") == {"pacsnode.mr-metastasis:9": 1}  # routine: 9

    assert wait_until(lambda: all(state_of(node.index, u) == "unmatched" for u in unmatched_uids.values()),
                      timeout=10)
    time.sleep(1.0)  # and they stay so: never dispatched
    for name, uid in unmatched_uids.items():
        row = study(node.index, uid)
        assert (row.state, row.reason, row.version) == ("unmatched", "no routing rule matched", 1), name
        assert node.index.jobs_of(uid) == [], name
    assert node.index.pending_jobs() == []
    assert sum(len(queued_task_ids(client, f"pacsnode.{p}")) for p, _ in expected.values()) == 3


def test_the_shipped_rules_are_the_ones_exercised_here() -> None:
    rules = {rule.pipeline: rule for rule in load_settings().routing.rules}
    assert rules["cxr-abnormality"].expect is not None and rules["cxr-abnormality"].expect.min_instances == 1
    assert rules["ct-hemorrhage"].priority == "urgent" and rules["ct-hemorrhage"].expect is None
    assert rules["mr-metastasis"].priority == "routine"
