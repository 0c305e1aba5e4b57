"""Health and Prometheus metrics over HTTP, bound to loopback by default."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.metrics import NodeMetrics


def _handler(metrics: NodeMetrics, health: Callable[[], dict[str, object]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path in ("/health", "/healthz"):
                state = health()
                code = 200 if state.get("ok") else 503
                body, ctype = json.dumps(state).encode(), "application/json"
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


def start_http(host: str, port: int, metrics: NodeMetrics,
               health: Callable[[], dict[str, object]]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(metrics, health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
