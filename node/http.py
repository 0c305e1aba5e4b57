"""The node's HTTP server: health, Prometheus metrics and the worklist (JSON API and web page).

Bound to loopback by default. When ``http.auth`` is set, every path except ``/health`` needs
credentials, ``/metrics`` included (it is operational detail of the site, and Prometheus can
send a bearer token or basic credentials); ``/health`` stays open for load balancers and
probes, and says no more than ok / disk / counts by state. Every request except health and
metrics scrapes (which would drown it) goes to the audit log, refused ones included.

Endpoints (GET):
  /health, /healthz               node health (JSON; 503 when not ok)
  /metrics                        Prometheus exposition
  /                               the worklist page (filter form: state, from, to, limit)
  /studies/<StudyInstanceUID>     one study's page
  /api/studies?state=&from=&to=&limit=   the worklist as JSON (dates: received, local, inclusive)
  /api/studies/<StudyInstanceUID> one study: series, jobs of every version, export objects
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config.settings import Settings
from node.audit import AuditLog
from node.auth import Authenticator
from node.index import StudyIndex
from node.metrics import NodeMetrics
from node.web import render_error, render_study, render_worklist
from node.worklist import QueryError, StudyQuery, Worklist

HEALTH_PATHS = frozenset({"/health", "/healthz"})
UNAUDITED_PATHS = HEALTH_PATHS | {"/metrics"}
JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
# Nothing on the page loads anything, runs anything or may be framed; answers are never cached.
COMMON_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))
HTML_HEADERS = (("Content-Security-Policy",
                 "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, value: object) -> Answer:
    return Answer(status, json.dumps(value, indent=1).encode(), JSON_TYPE)


def _html(status: int, page: str) -> Answer:
    return Answer(status, page.encode(), HTML_TYPE, HTML_HEADERS)


class Routes:
    """What each path answers, given an authorised request."""

    def __init__(self, metrics: NodeMetrics, worklist: Worklist) -> None:
        self._metrics = metrics
        self._worklist = worklist

    def answer(self, path: str, params: dict[str, list[str]]) -> Answer:
        try:
            if path == "/metrics":
                return Answer(200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST)
            if path == "/api/studies":
                return self._api_list(params)
            if path.startswith("/api/studies/"):
                return self._api_study(unquote(path.removeprefix("/api/studies/")))
            if path in ("/", "/index.html"):
                return self._page_list(params)
            if path.startswith("/studies/"):
                return self._page_study(unquote(path.removeprefix("/studies/")))
        except sqlite3.Error as exc:  # a busy or damaged index: the request fails, the node goes on
            message = f"index not readable: {type(exc).__name__}"
            return _json(503, {"error": message}) if path.startswith("/api/") else _html(503, render_error(503, message))
        if path.startswith("/api/"):
            return _json(404, {"error": "no such endpoint"})
        return _html(404, render_error(404, "no such page"))

    def _api_list(self, params: dict[str, list[str]]) -> Answer:
        try:
            query = StudyQuery.from_params(params)
        except QueryError as exc:
            return _json(400, {"error": str(exc)})
        studies = self._worklist.studies(query)
        return _json(200, {
            "query": query.to_json(),
            "count": len(studies),
            "states": self._worklist.counts_by_state(),
            "exports": self._worklist.export_counts(),
            "studies": [s.to_json() for s in studies],
        })

    def _api_study(self, study_uid: str) -> Answer:
        detail = self._worklist.study(study_uid)
        if detail is None:
            return _json(404, {"error": "study not found", "study_uid": study_uid})
        return _json(200, detail.to_json())

    def _page_list(self, params: dict[str, list[str]]) -> Answer:
        try:
            query = StudyQuery.from_params(params)
        except QueryError as exc:
            return _html(400, render_worklist([], StudyQuery(), self._worklist.counts_by_state(),
                                              self._worklist.export_counts(), error=str(exc)))
        return _html(200, render_worklist(self._worklist.studies(query), query, self._worklist.counts_by_state(),
                                          self._worklist.export_counts()))

    def _page_study(self, study_uid: str) -> Answer:
        detail = self._worklist.study(study_uid)
        if detail is None:
            return _html(404, render_error(404, f"study {study_uid} not found"))
        return _html(200, render_study(detail))


def _handler(routes: Routes, health: Callable[[], dict[str, object]], auth: Authenticator,
             audit: AuditLog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            split = urlsplit(self.path)
            if split.path in HEALTH_PATHS:
                state = health()
                self._send(_json(200 if state.get("ok") else 503, state))
                return
            machine = split.path.startswith("/api/") or split.path == "/metrics"
            verdict = auth.check(self.headers.get("Authorization"))
            if verdict.allowed:
                answer = routes.answer(split.path, parse_qs(split.query, keep_blank_values=True))
            else:
                refused = (_json(401, {"error": "authentication required"}) if machine
                           else _html(401, render_error(401, "authentication required")))
                answer = Answer(401, refused.body, refused.content_type,
                                refused.headers + (("WWW-Authenticate", auth.challenge()),))
            if split.path not in UNAUDITED_PATHS:
                try:  # recorded before anything is shown: no view without its record
                    audit.record(client=self.client_address[0], user=verdict.user, method=self.command,
                                 path=self.path, status=answer.status)
                except OSError:
                    message = "audit log not writable"
                    answer = _json(503, {"error": message}) if machine else _html(503, render_error(503, message))
            self._send(answer)

        def _send(self, answer: Answer) -> None:
            self.send_response(answer.status)
            for name, value in (("Content-Type", answer.content_type),
                                ("Content-Length", str(len(answer.body))), *COMMON_HEADERS, *answer.headers):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: object) -> None:
            return  # requests go to the audit log; the node's log stays free of paths

    return Handler


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def audit_log_path(settings: Settings) -> Path:
    """``http.audit_log``, or ``<data_dir>/audit.log``."""
    return settings.http.audit_log or settings.node.data_dir / "audit.log"


def start_http(settings: Settings, metrics: NodeMetrics, health: Callable[[], dict[str, object]],
               index: StudyIndex) -> ThreadingHTTPServer:
    handler = _handler(Routes(metrics, Worklist(index)), health, Authenticator(settings.http),
                       AuditLog(audit_log_path(settings)))
    server_class = _IPv6Server if ":" in settings.http.host else ThreadingHTTPServer
    server = server_class((settings.http.host, settings.http.port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
