"""The node's HTTP server: health, Prometheus metrics and the worklist (JSON API and web page).

A Starlette app on uvicorn, run in a thread of the node. Bound to loopback by default. When
``http.auth`` is set, every path except ``/health`` needs credentials, ``/metrics`` included (it
is operational detail of the site, and Prometheus can send a bearer token or basic credentials);
``/health`` stays open for load balancers and probes, and says no more than ok / disk / counts by
state. Every request except health and metrics scrapes (which would drown it) goes to the audit
log before anything is shown, refused ones included; if the audit log cannot be written, nothing
is shown (503).

DICOMweb (STOW-RS, QIDO-RS, WADO-RS) is mounted at ``/dicomweb`` (``node.dicomweb``).

Endpoints (GET):
  /health, /healthz               node health (JSON; 503 when not ok)
  /metrics                        Prometheus exposition
  /                               the worklist page (filter form: state, from, to, limit)
  /studies/<StudyInstanceUID>     one study's page
  /studies/<StudyInstanceUID>/key-images/<pipeline>/<n>.png   a finding's key image, rendered (PNG)
  /api/studies?state=&from=&to=&limit=&sort=&order=   the worklist as JSON, urgent studies first
                                  (dates: received, local, inclusive)
  /api/studies/<StudyInstanceUID> one study: series, jobs of every version, export objects
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from config.settings import Settings
from node.audit import AuditLog
from node.auth import Authenticator
from node.dicomweb import DicomWeb
from node.index import StudyIndex
from node.key_image import RenderError, render_key_image
from node.metrics import NodeMetrics
from node.scp import StorageSCP
from node.store import StudyStore
from node.web import Pages
from node.worklist import QueryError, StudyQuery, Worklist

HEALTH_PATHS = frozenset({"/health", "/healthz"})
UNAUDITED_PATHS = HEALTH_PATHS | {"/metrics"}
# Nothing on the page runs anything, loads anything but our own key images, or may be framed;
# answers are never cached.
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
HTML_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline';"
                " form-action 'self'; frame-ancestors 'none'"}
START_TIMEOUT_S = 10.0


def _machine(path: str) -> bool:
    """Paths that answer JSON (or the metrics text) rather than a page, errors included."""
    return path.startswith(("/api/", "/dicomweb")) or path == "/metrics"


class Endpoints:
    """What each path answers, given an authorised request."""

    def __init__(self, metrics: NodeMetrics, worklist: Worklist, health: Callable[[], dict[str, object]],
                 pages: Pages, store: StudyStore) -> None:
        self._metrics = metrics
        self._worklist = worklist
        self._health = health
        self.pages = pages
        self._store = store

    def html(self, status: int, page: str) -> HTMLResponse:
        return HTMLResponse(page, status, headers=HTML_HEADERS)

    def error(self, path: str, status: int, message: str) -> Response:
        if _machine(path):
            return JSONResponse({"error": message}, status)
        return self.html(status, self.pages.error(status, message))

    def health(self, request: Request) -> Response:
        state = self._health()
        return JSONResponse(state, 200 if state.get("ok") else 503)

    def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self._metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def api_list(self, request: Request) -> Response:
        try:
            query = StudyQuery.from_params(_params(request))
        except QueryError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        studies = self._worklist.studies(query)
        return JSONResponse({
            "query": query.to_json(),
            "count": len(studies),
            "states": self._worklist.counts_by_state(),
            "exports": self._worklist.export_counts(),
            "studies": [s.to_json() for s in studies],
        })

    def api_study(self, request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        detail = self._worklist.study(study_uid)
        if detail is None:
            return JSONResponse({"error": "study not found", "study_uid": study_uid}, 404)
        return JSONResponse(detail.to_json())

    def page_list(self, request: Request) -> Response:
        try:
            query = StudyQuery.from_params(_params(request))
        except QueryError as exc:
            return self.html(400, self.pages.worklist([], StudyQuery(), self._worklist.counts_by_state(),
                                                      self._worklist.export_counts(), error=str(exc)))
        return self.html(200, self.pages.worklist(self._worklist.studies(query), query,
                                                  self._worklist.counts_by_state(), self._worklist.export_counts()))

    def page_study(self, request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        detail = self._worklist.study(study_uid)
        if detail is None:
            return self.html(404, self.pages.error(404, f"study {study_uid} not found"))
        return self.html(200, self.pages.study(detail))

    def key_image(self, request: Request) -> Response:
        """A key image as PNG (a plain function: Starlette runs it off the event loop, as it decodes pixels)."""
        params = request.path_params
        source = self._worklist.key_image(params["study_uid"], params["pipeline"], params["number"])
        if source is None:
            return self.error(request.url.path, 404, "no such key image")
        try:
            png = render_key_image(self._store.resolve(source.path), source.frame, source.window,
                                   [self._store.resolve(p) for p in source.seg_paths])
        except RenderError as exc:
            return self.error(request.url.path, 422, str(exc))
        return Response(png, media_type="image/png")

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health), Route("/healthz", self.health), Route("/metrics", self.metrics),
            Route("/", self.page_list), Route("/index.html", self.page_list),
            Route("/studies/{study_uid}/key-images/{pipeline}/{number:int}.png", self.key_image),
            Route("/studies/{study_uid:path}", self.page_study),
            Route("/api/studies", self.api_list), Route("/api/studies/{study_uid:path}", self.api_study),
        ]


def _params(request: Request) -> dict[str, list[str]]:
    return {key: request.query_params.getlist(key) for key in request.query_params}


class Guard(BaseHTTPMiddleware):
    """Authentication, the audit record and the common headers, around every endpoint."""

    def __init__(self, app: Callable[..., Awaitable[None]], endpoints: Endpoints, auth: Authenticator,
                 audit: AuditLog) -> None:
        super().__init__(app)
        self._endpoints = endpoints
        self._auth = auth
        self._audit = audit

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if path in HEALTH_PATHS:
            response = await call_next(request)
        else:
            verdict = self._auth.check(request.headers.get("authorization"))
            if verdict.allowed:
                response = await call_next(request)
            else:
                response = self._endpoints.error(path, 401, "authentication required")
                response.headers["WWW-Authenticate"] = self._auth.challenge()
            if path not in UNAUDITED_PATHS:
                target = path + (f"?{request.url.query}" if request.url.query else "")
                try:  # recorded before anything is shown: no view without its record
                    self._audit.record(client=request.client.host if request.client else "", user=verdict.user,
                                       method=request.method, path=target, status=response.status_code)
                except OSError:
                    response = self._endpoints.error(path, 503, "audit log not writable")
        response.headers.update(COMMON_HEADERS)
        return response


def build_app(settings: Settings, metrics: NodeMetrics, health: Callable[[], dict[str, object]],
              index: StudyIndex, store: StudyStore, dicomweb: DicomWeb) -> Starlette:
    # Patient names only behind authentication (the settings refuse show_patient_name without it), so
    # every view of one is in the audit log.
    worklist = Worklist(index, store, show_patient_name=settings.http.show_patient_name)
    endpoints = Endpoints(metrics, worklist, health, Pages(settings.http.refresh_s), store)

    def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        path = request.url.path
        if status == 405:
            return endpoints.error(path, 405, "method not allowed")
        return endpoints.error(path, 404, "no such endpoint" if _machine(path) else "no such page")

    def index_unreadable(request: Request, exc: Exception) -> Response:
        # A busy or damaged index: the request fails, the node goes on.
        return endpoints.error(request.url.path, 503, f"index not readable: {type(exc).__name__}")

    return Starlette(
        routes=endpoints.routes() + dicomweb.routes(),
        middleware=[Middleware(Guard, endpoints=endpoints, auth=Authenticator(settings.http),
                               audit=AuditLog(audit_log_path(settings)))],
        exception_handlers={HTTPException: not_found, sqlite3.Error: index_unreadable},
    )


def audit_log_path(settings: Settings) -> Path:
    """``http.audit_log``, or ``<data_dir>/audit.log``."""
    return settings.http.audit_log or settings.node.data_dir / "audit.log"


class HttpServer:
    """uvicorn serving the app in a daemon thread; ``shutdown`` stops it and waits."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        # log_config=None: uvicorn must not reconfigure the node's logging; no access log (the audit
        # log is the record of requests, and the node's log stays free of paths).
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                                     lifespan="off", log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self._server.config.host}:{self._server.config.port} "
                              "(port in use?)")
            time.sleep(0.02)

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return str(host), int(port)

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_http(settings: Settings, metrics: NodeMetrics, health: Callable[[], dict[str, object]],
               index: StudyIndex, scp: StorageSCP, store: StudyStore) -> HttpServer:
    app = build_app(settings, metrics, health, index, store, DicomWeb(scp, store, index))
    server = HttpServer(app, settings.http.host, settings.http.port)
    server.start()
    return server
