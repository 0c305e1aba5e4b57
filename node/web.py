"""The worklist as server-rendered HTML: Jinja2 templates (``node/templates``), one table with a
filter form and sortable columns, and one page per study with its key images.

No scripts and no external resources (the answer's Content-Security-Policy forbids both, images
excepted, which come from this server), so the page works offline on a reading-room workstation:
sorting is a link, refreshing a ``<meta http-equiv="refresh">``. Autoescaping is on for every
template.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

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

# Column headings of the worklist that sort, by the node.worklist.SORT_COLUMNS key they sort on.
SORTABLE_HEADINGS = {"received": "received", "state": "state", "study_date": "study date",
                     "description": "description", "images": "images"}


def _probability(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


class Pages:
    """The templates, loaded once per HTTP server (Jinja2 caches what it compiled)."""

    def __init__(self, refresh_s: int = 0) -> None:
        self._refresh_s = refresh_s
        self._env = Environment(loader=PackageLoader("node", "templates"), autoescape=select_autoescape(["html"]),
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._env.filters.update(short_time=short_time, duration=duration_text, probability=_probability,
                                 quote=lambda value: quote(str(value), safe=""))

    def worklist(self, studies: list[StudyEntry], query: StudyQuery, counts: dict[str, int],
                 export_counts: dict[str, int], error: str | None = None) -> str:
        """The worklist page; ``error`` (a bad filter) is shown above an empty table."""
        def sort_link(key: str) -> str:
            """The same query sorted by ``key``: reversed when it is already sorted so, else descending."""
            order = ("desc" if query.ascending else "asc") if query.sort == key else "desc"
            return "/?" + urlencode(query.params(sort=key, order=order))

        return self._env.get_template("worklist.html").render(
            title="pacsnode worklist", studies=studies, query=query, states=counts, exports=export_counts,
            error=error, date_basis=DATE_BASIS, all_states=[s.value for s in StudyState],
            refresh_s=self._refresh_s, sortable=SORTABLE_HEADINGS, sort_link=sort_link,
            show_patient=any(s.patient_name is not None for s in studies),
            urgent_count=sum(1 for s in studies if s.urgent))

    def study(self, detail: StudyDetail) -> str:
        return self._env.get_template("study.html").render(
            title=f"study {detail.study.accession or detail.study.study_uid}", detail=detail,
            refresh_s=self._refresh_s,
            series_rows=[(s.series_uid, "" if s.series_number is None else s.series_number, s.modality, s.body_part,
                          s.series_description, s.kind, s.instance_count) for s in detail.series],
            job_rows=[(j.pipeline, j.version, j.state, j.attempts, ", ".join(f.text() for f in j.findings),
                       j.result_objects, short_time(j.result_at), j.reason) for j in detail.jobs],
            export_rows=[(e.destination, e.sop_uid, e.kind, e.state, e.attempts, e.last_status,
                          short_time(retry_at(e)), short_time(e.sent_at)) for e in detail.exports],
            notification_rows=[(n.target, n.version, "yes" if n.urgent else "no", n.state, n.attempts, n.last_status,
                                short_time(n.next_attempt_at if n.state == "pending" else None),
                                short_time(n.sent_at)) for n in detail.notifications])

    def error(self, status: int, message: str) -> str:
        return self._env.get_template("error.html").render(title=str(status), status=status, message=message,
                                                           refresh_s=0)
