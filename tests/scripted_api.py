"""A loopback HTTP server whose every answer a test scripts: for answers no simulator gives.

`route(method, path, body)` returns (status, JSON-able body) or (status, body, headers); the server
records each request as (method, path). It serves HTTP/1.1 on 127.0.0.1 in daemon threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Trickle:
    """A body sent `step` bytes at a time, `every_s` apart (a server that answers slowly)."""

    data: bytes
    every_s: float
    step: int = 1


Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]]
Route = Callable[[str, str, bytes], Answer]


class ScriptedApi:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path))
                status, payload, *rest = outer.route(self.command, self.path, body)
                headers = rest[0] if rest else {}
                if isinstance(payload, Trickle):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload.data)))
                    self.end_headers()
                    for start in range(0, len(payload.data), payload.step):
                        self.wfile.write(payload.data[start : start + payload.step])
                        self.wfile.flush()
                        time.sleep(payload.every_s)
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                if not isinstance(payload, bytes):
                    self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self, prefix: str = "") -> list[str]:
        return [path for _, path in self.requests if path.startswith(prefix)]


@contextmanager
def scripted_api(route: Route) -> Iterator[ScriptedApi]:
    api = ScriptedApi(route)
    thread = threading.Thread(target=api._server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api._server.shutdown()
        api._server.server_close()
        thread.join()
