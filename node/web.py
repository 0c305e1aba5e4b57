"""The worklist as server-rendered HTML: Jinja2 templates (``node/templates``), one table with a
filter form, and one page per study.

No scripts and no external resources (the answer's Content-Security-Policy forbids both), so the
page works offline on a reading-room workstation; autoescaping is on for every template.
"""

from __future__ import annotations

from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from node.index import StudyState
from node.worklist import DATE_BASIS, StudyDetail, StudyEntry, StudyQuery, duration_text, retry_at, short_time


class Pages:
    """The templates, loaded once per HTTP server (Jinja2 caches what it compiled)."""

    def __init__(self) -> None:
        self._env = Environment(loader=PackageLoader("node", "templates"), autoescape=select_autoescape(["html"]),
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._env.filters.update(short_time=short_time, duration=duration_text,
                                 quote=lambda value: quote(str(value), safe=""))

    def worklist(self, studies: list[StudyEntry], query: StudyQuery, counts: dict[str, int],
                 export_counts: dict[str, int], error: str | None = None) -> str:
        """The worklist page; ``error`` (a bad filter) is shown above an empty table."""
        return self._env.get_template("worklist.html").render(
            title="pacsnode worklist", studies=studies, query=query, states=counts, exports=export_counts,
            error=error, date_basis=DATE_BASIS, all_states=[s.value for s in StudyState])

    def study(self, detail: StudyDetail) -> str:
        return self._env.get_template("study.html").render(
            title=f"study {detail.study.study_uid}", detail=detail,
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
        return self._env.get_template("error.html").render(title=str(status), status=status, message=message)
