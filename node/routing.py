"""Routing: which pipelines a complete study goes to, decided from its series' attributes.

A rule matches a study when at least one of its image series satisfies the rule's condition
tree (``all`` / ``any`` of attribute conditions); the matching series are what the pipeline
gets. Unmatched studies are kept and listed, never dispatched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from config.settings import AllOf, AnyOf, AttributeCondition, Condition, Expectation, RoutingRule
from node.index import SeriesRow


def _values(series: SeriesRow, attribute: str) -> list[str]:
    """The series' values of an attribute; multi-valued ones (ImageType) split on backslash."""
    raw: object = {
        "Modality": series.modality,
        "BodyPartExamined": series.body_part,
        "SOPClassUID": series.sop_class_uid,
        "ImageType": series.image_type,
        "SeriesDescription": series.series_description,
        "StudyDescription": series.study_description,
        "SliceThickness": series.slice_thickness,
        "Rows": series.rows,
        "Columns": series.columns,
        "InstanceCount": series.instance_count,
    }[attribute]
    if raw is None or raw == "":
        return []
    return str(raw).split("\\") if isinstance(raw, str) else [str(raw)]


def _attribute_matches(condition: AttributeCondition, series: SeriesRow) -> bool:
    values = _values(series, condition.attribute)
    if condition.equals is not None:
        return any(_equal(v, condition.equals) for v in values)
    if condition.in_ is not None:
        wanted = {w.upper() for w in condition.in_}
        return any(v.upper() in wanted for v in values)
    if condition.regex is not None:
        pattern = re.compile(condition.regex)
        return any(pattern.search(v) for v in values) if values else bool(pattern.fullmatch(""))
    numbers = [float(v) for v in values if _is_number(v)]
    return any(
        (condition.min is None or n >= condition.min) and (condition.max is None or n <= condition.max)
        for n in numbers
    )


def _equal(value: str, wanted: str | float) -> bool:
    if isinstance(wanted, (int, float)) and _is_number(value):
        return float(value) == float(wanted)
    return value.upper() == str(wanted).upper()


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def condition_matches(condition: Condition, series: SeriesRow) -> bool:
    if isinstance(condition, AllOf):
        return all(condition_matches(c, series) for c in condition.all)
    if isinstance(condition, AnyOf):
        return any(condition_matches(c, series) for c in condition.any)
    return _attribute_matches(condition, series)


@dataclass(frozen=True)
class Route:
    rule: RoutingRule
    series: list[SeriesRow]


def route(rules: list[RoutingRule], series: list[SeriesRow]) -> list[Route]:
    """Every rule with at least one matching series, in config order, one route per pipeline."""
    routes: list[Route] = []
    pipelines: set[str] = set()
    for rule in rules:
        matched = [s for s in series if condition_matches(rule.match, s)]
        if matched and rule.pipeline not in pipelines:
            routes.append(Route(rule=rule, series=matched))
            pipelines.add(rule.pipeline)
    return routes


def expectation_met(expectation: Expectation, series: list[SeriesRow]) -> bool:
    """True when the study already holds everything the rule says it needs."""
    if expectation.min_instances is not None and sum(s.instance_count for s in series) < expectation.min_instances:
        return False
    return all(
        any(re.search(pattern, s.series_description) for s in series)
        for pattern in expectation.series_descriptions
    )
