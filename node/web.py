"""The worklist as server-rendered HTML: one table with a filter form, and one page per study.

No scripts and no external resources (the answer's Content-Security-Policy forbids both), so the
page works offline on a reading-room workstation; every value goes through ``html.escape``.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from node.index import StudyState
from node.worklist import (
    DATE_BASIS,
    StudyDetail,
    StudyEntry,
    StudyQuery,
    duration_text,
    retry_at,
    short_time,
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#f0f0f0}td.uid{font-family:monospace;word-break:break-all;max-width:28em}
.state-failed{color:#b00020}.state-done{color:#006400}.error{color:#b00020;font-weight:bold}
form{margin:1em 0}label{margin-right:1em}
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def _cell(value: object, css: str = "") -> str:
    cls = f' class="{escape(css)}"' if css else ""
    return f"<td{cls}>{escape(str(value))}</td>"


def _counts(title: str, counts: dict[str, int]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    return f"<p>{escape(title)}: {escape(text)}</p>"


def _filter_form(query: StudyQuery) -> str:
    options = ['<option value="">any</option>'] + [
        f'<option value="{escape(s.value)}"{" selected" if s.value == query.state else ""}>{escape(s.value)}</option>'
        for s in StudyState
    ]
    start = query.date_from.isoformat() if query.date_from else ""
    end = query.date_to.isoformat() if query.date_to else ""
    return (
        '<form method="get" action="/">'
        f'<label>state <select name="state">{"".join(options)}</select></label>'
        f'<label>received from <input type="date" name="from" value="{escape(start)}"></label>'
        f'<label>to <input type="date" name="to" value="{escape(end)}"></label>'
        f'<label>rows <input type="number" name="limit" min="1" max="1000" value="{query.limit}"></label>'
        '<button type="submit">filter</button></form>'
    )


def render_worklist(studies: list[StudyEntry], query: StudyQuery, counts: dict[str, int],
                    export_counts: dict[str, int], error: str | None = None) -> str:
    """The worklist page; ``error`` (a bad filter) is shown above an empty table."""
    rows = []
    for study in studies:
        link = f'<a href="/studies/{quote(study.study_uid, safe="")}">{escape(study.study_uid)}</a>'
        rows.append(
            f'<tr data-study-uid="{escape(study.study_uid)}" data-state="{escape(study.state)}">'
            f'<td class="uid">{link}</td>{_cell(study.version)}{_cell(study.state, "state-" + study.state)}'
            f"{_cell(study.study_date)}{_cell(study.study_description)}{_cell(study.image_count)}"
            f"{_cell(', '.join(f'{p.pipeline}:{p.state}' for p in study.pipelines))}"
            f"{_cell(study.findings_text())}{_cell(short_time(study.received_at))}"
            f"{_cell(short_time(study.completed_at))}{_cell(short_time(study.result_at))}"
            f"{_cell(duration_text(study.processing_s))}{_cell(study.exports_text())}{_cell(study.reason)}</tr>"
        )
    head = "".join(f"<th>{escape(h)}</th>" for h in (
        "Study Instance UID", "v", "state", "study date", "description", "images", "pipelines", "findings",
        "received", "completed", "result", "processing", "export", "reason"))
    body = (
        "<h1>pacsnode worklist</h1>"
        + _counts("Studies by state", counts) + _counts("Export objects by state", export_counts)
        + _filter_form(query)
        + (f'<p class="error">{escape(error)}</p>' if error else "")
        + f"<p>{len(studies)} studies, newest {escape(DATE_BASIS)} first (dates: {escape(DATE_BASIS)} day,"
          " node local time)</p>"
        + f'<table id="studies"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return _page("pacsnode worklist", body)


def _table(headers: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_study(detail: StudyDetail) -> str:
    study = detail.study
    facts = (
        ("state", study.state), ("version", study.version), ("reason", study.reason),
        ("study date", study.study_date), ("description", study.study_description),
        ("images", study.image_count), ("received", short_time(study.received_at)),
        ("last instance", short_time(study.last_instance_at)), ("completed", short_time(study.completed_at)),
        ("result", short_time(study.result_at)), ("processing", duration_text(study.processing_s)),
        ("export", study.exports_text()),
    )
    body = (
        f'<p><a href="/">worklist</a> · <a href="/api/studies/{quote(study.study_uid, safe="")}">JSON</a></p>'
        f"<h1>{escape(study.study_uid)}</h1><table><tbody>"
        + "".join(f"<tr><th>{escape(name)}</th>{_cell(value)}</tr>" for name, value in facts)
        + "</tbody></table>"
        + "<h2>Series</h2>"
        + _table(("Series Instance UID", "number", "modality", "body part", "description", "kind", "instances"),
                 [(s.series_uid, "" if s.series_number is None else s.series_number, s.modality, s.body_part,
                   s.series_description, s.kind, s.instance_count) for s in detail.series])
        + "<h2>Jobs</h2>"
        + _table(("pipeline", "v", "state", "attempts", "findings", "results", "result", "reason"),
                 [(j.pipeline, j.version, j.state, j.attempts, ", ".join(f.text() for f in j.findings),
                   j.result_objects, short_time(j.result_at), j.reason) for j in detail.jobs])
        + "<h2>Export</h2>"
        + _table(("destination", "SOP Instance UID", "kind", "state", "attempts", "last status", "next attempt",
                  "sent"),
                 [(e.destination, e.sop_uid, e.kind, e.state, e.attempts, e.last_status,
                   short_time(retry_at(e)), short_time(e.sent_at)) for e in detail.exports])
    )
    return _page(f"study {study.study_uid}", body)


def render_error(status: int, message: str) -> str:
    return _page(str(status), f'<h1>{status}</h1><p class="error">{escape(message)}</p><p><a href="/">worklist</a></p>')
