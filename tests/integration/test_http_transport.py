"""PooledTransport: httpx's client over urllib3's pools speaks HTTP and fails as httpx would."""

from __future__ import annotations

import gc
import gzip
import json
import socket
import threading
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from adapters.http import RetryPolicy, new_http_client, send_with_retry
from domain.errors import PermanentError, TransientError


class Echo(BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON; /gzip answers compressed."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "header_lines": [[k.lower(), v] for k, v in self.headers.items()],
            "body": self.rfile.read(length).decode(),
            "peer_port": self.client_address[1],
        }
        content = json.dumps(seen).encode()
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "a=1")
        self.send_header("Set-Cookie", "b=2")
        if self.path == "/gzip":
            content = gzip.compress(content)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_requests_carry_method_path_query_headers_and_body(echo_url: str) -> None:
    with new_http_client() as http:
        answer = http.post(
            f"{echo_url}/customers/a%2Fb/users?limit=5&cursor=x%3D",
            json={"items": ["é"]},
            headers={"Authorization": "Bearer t0k"},
        )
    seen = answer.json()
    assert answer.status_code == 200
    assert seen["method"] == "POST"
    assert seen["path"] == "/customers/a%2Fb/users?limit=5&cursor=x%3D"
    assert seen["headers"]["authorization"] == "Bearer t0k"
    assert seen["headers"]["host"] == echo_url.removeprefix("http://")
    assert json.loads(seen["body"]) == {"items": ["é"]}
    assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_a_repeated_request_header_is_sent_with_every_value(echo_url: str) -> None:
    # The transport hands urllib3 a plain dict unless a name repeats; then a multi-dict.
    with new_http_client() as http:
        answer = http.get(echo_url, headers=[("X-Tag", "a"), ("X-Tag", "b"), ("X-One", "c")])
    lines = answer.json()["header_lines"]
    assert [v for k, v in lines if k == "x-tag"] == ["a", "b"]
    assert [v for k, v in lines if k == "x-one"] == ["c"]


def test_cookies_an_answer_sets_are_not_kept_or_sent_back(echo_url: str) -> None:
    # One client serves every customer with bearer tokens: no session state crosses requests.
    with new_http_client() as http:
        first = http.get(f"{echo_url}/one")
        second = http.get(f"{echo_url}/two").json()
        assert first.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert "cookie" not in second["headers"]
        assert len(http.cookies) == 0
        with pytest.raises(ValueError, match="keeps no cookies"):
            http.cookies = {"a": "1"}


def test_an_answer_is_freed_without_the_garbage_collector_and_stays_readable(
    echo_url: str,
) -> None:
    # httpx binds an answer's stream to the answer: a reference cycle per request that only the
    # cyclic collector freed (with its request, URL and headers), a worker's main source of it.
    with new_http_client() as http:
        answer = http.get(f"{echo_url}/one")
        gc.disable()
        try:
            assert answer.json()["path"] == "/one" and answer.is_closed
            assert answer.elapsed.total_seconds() > 0
            assert b"".join(answer.iter_bytes()) == answer.content
            gone = weakref.ref(answer)
            del answer
            assert gone() is None
        finally:
            gc.enable()
        with http.stream("GET", f"{echo_url}/two") as streaming:  # left as httpx made it
            assert json.loads(streaming.read())["path"] == "/two"


def test_connections_are_reused_and_content_encoding_is_decoded(echo_url: str) -> None:
    with new_http_client() as http:
        ports = {http.get(f"{echo_url}/gzip").json()["peer_port"] for _ in range(5)}
        assert http.get(f"{echo_url}/missing").status_code == 404
    assert len(ports) == 1


def test_concurrent_requests_each_get_their_own_answer(echo_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with new_http_client(max_connections=4) as http, ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(lambda i: http.get(f"{echo_url}/n{i}").json()["path"], range(64)))
    assert paths == [f"/n{i}" for i in range(64)]


def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with new_http_client() as http, pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/")


def test_a_silent_server_is_an_httpx_read_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with new_http_client(timeout_s=0.2) as http, pytest.raises(httpx.ReadTimeout):
            http.get(f"http://127.0.0.1:{port}/")


def test_a_connection_closed_without_an_answer_is_retried_then_transient() -> None:
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen()
        port = rude.getsockname()[1]
        stop = threading.Event()

        def hang_up() -> None:
            rude.settimeout(0.1)
            while not stop.is_set():
                try:
                    connection, _ = rude.accept()
                except TimeoutError:
                    continue
                connection.recv(65536)
                connection.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            with new_http_client() as http, pytest.raises(TransientError) as raised:
                send_with_retry(
                    lambda: http.get(f"http://127.0.0.1:{port}/"),
                    call="GET sm users",
                    customer_id="c1",
                    policy=RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01),
                    describe=lambda response: (None, response.text),
                )
        finally:
            stop.set()
            thread.join()
    assert "2 attempt(s)" in str(raised.value)
    assert isinstance(raised.value.__cause__, httpx.TransportError)


def test_a_header_that_cannot_be_sent_fails_permanently_without_quoting_it(echo_url: str) -> None:
    secret = "s3cret\r\nX-Injected: 1"
    with new_http_client() as http, pytest.raises(PermanentError) as raised:
        send_with_retry(
            lambda: http.get(echo_url, headers={"Authorization": f"Bearer {secret}"}),
            call="GET sm users",
            customer_id="c1",
            policy=RetryPolicy(attempts=3),
            describe=lambda response: (None, response.text),
        )
    assert "s3cret" not in str(raised.value)
    assert raised.value.__cause__ is None
