"""Shared HTTP plumbing: the pooled client, the retry policy, and answers mapped to errors."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn, Self, TypeVar
from urllib.parse import quote, quote_plus

import httpx
import pydantic_core
import urllib3
import urllib3.exceptions
from pydantic import TypeAdapter, ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception

from adapters import metrics
from domain.errors import PermanentError, TransientError

USER_AGENT = "sfsync/0.1 (+httpx)"

# 429 and these 5xx say "not now": the same request may succeed later.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Transport failures caused by our own request or configuration: retrying sends the same mistake.
PERMANENT_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
)
# Server texts end up in exception messages and logs: keep them readable, not whole HTML pages.
MAX_SERVER_MESSAGE_CHARS = 300
# A bearer token travels in a header: visible ASCII only (RFC 9110 field value, RFC 6750 token).
# Anything else must be refused before httpx sees it, because h11 refuses it with a message that
# quotes the whole header, token included, and httpcore logs that message.
_SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")

_log = logging.getLogger("sfsync.adapters.http")

_T = TypeVar("_T")

Describe = Callable[[httpx.Response], tuple[str | None, str]]
"""Turns an error answer into (machine code, human message) in the dialect of one API."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one HTTP call before giving up with a TransientError.

    Stops after `attempts` tries or when the next wait would end past `total_seconds`, whichever
    comes first. Waits grow exponentially with jitter from `initial_backoff_s` up to
    `max_backoff_s`, unless the server said how long to wait (Retry-After, capped by
    `max_retry_after_s`).
    """

    attempts: int = 5
    total_seconds: float = 30.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0
    # Seams for tests: waiting and measuring the budget without real time passing.
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        if self.total_seconds <= 0:
            raise ValueError(
                f"RetryPolicy.total_seconds must be positive, not {self.total_seconds}"
            )
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s, not "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.max_retry_after_s < 0:
            raise ValueError("RetryPolicy.max_retry_after_s must not be negative")

    def backoff(self, retry_number: int) -> float:
        """The wait before retry number `retry_number` (1-based) when the server gave no hint."""
        exponential = self.initial_backoff_s * 2.0 ** (retry_number - 1)
        # Jitter spreads the retries of many workers hit by the same outage.
        jittered = exponential + random.uniform(0, self.initial_backoff_s)
        return min(max(jittered, self.initial_backoff_s), self.max_backoff_s)


# Hosts whose connections are kept open at once: SM is one host, each ShareFile account two.
POOLED_HOSTS = 64
# Bytes asked for per read of an answer's body: whatever has arrived, up to this, comes back.
_READ_CHUNK = 1 << 20


class PooledTransport(httpx.BaseTransport):
    """httpx's transport interface over urllib3's per-host connection pools.

    Why not httpx's own (httpcore) pool: it re-scans every connection and every queued request
    under one lock on each request and each response close (encode/httpcore#1035, unreleased
    in httpcore 1.0). With a worker's 16 to 64 threads sharing one client, that costs more CPU
    than the HTTP exchange itself and grows with the thread count: on the simulators, 0.9 ms of
    CPU per request with 32 threads and 1.2-1.4 ms with 64 (throughput falling), against about
    0.4 ms for urllib3, whose pool is a per-host queue of idle connections. The httpx
    documentation points to urllib3 for exactly this ("Custom transports"). The client API,
    its timeouts, headers, status handling and exception types stay httpx's: this class maps
    urllib3's errors onto httpx's hierarchy so that `send_with_retry` sees the same errors.

    Bodies are read whole before returning (both APIs answer JSON pages of bounded size), and
    content decoding is left to httpx. Proxies from the environment still go through httpx's
    own transports (httpx mounts them in front of this one).
    """

    def __init__(self, *, max_connections: int = 100, ssl_context: Any = None) -> None:
        self._pools = urllib3.PoolManager(
            num_pools=POOLED_HOSTS,
            # Idle connections kept per host; more concurrent calls open extra ones (block=False).
            maxsize=max_connections,
            block=False,
            retries=False,  # send_with_retry decides about retries
            ssl_context=ssl_context if ssl_context is not None else httpx.create_ssl_context(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout", {})
        raw = request.headers.raw
        # A plain dict unless a name repeats: urllib3 iterates its HTTPHeaderDict in Python, and
        # the dict saved about 11 us of a 235 us request's CPU.
        headers: dict[str, str] | urllib3.HTTPHeaderDict = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in raw
        }
        if len(headers) != len(raw):
            headers = urllib3.HTTPHeaderDict()
            for name, value in raw:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        read_timeout = timeouts.get("read")
        try:
            pool = self._pools.connection_from_host(url.host, url.port, url.scheme)
            started = time.monotonic()
            answer = pool.urlopen(
                request.method,
                url.raw_path.decode("ascii"),
                body=request.read() or None,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                timeout=urllib3.Timeout(connect=timeouts.get("connect"), read=read_timeout),
                preload_content=False,
                decode_content=False,
            )
            body = _read_within(answer, None if read_timeout is None else started + read_timeout)
        except (urllib3.exceptions.HTTPError, ValueError, OSError) as exc:
            raise _as_httpx_error(exc, request) from exc
        return httpx.Response(
            answer.status,
            headers=list(answer.headers.items()),
            stream=httpx.ByteStream(body),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (answer.reason or "").encode(),
            },
        )

    def close(self) -> None:
        self._pools.clear()


def _read_within(answer: urllib3.BaseHTTPResponse, deadline: float | None) -> bytes:
    """The whole body, read as it arrives; ReadTimeoutError once `deadline` has passed.

    The read timeout bounds each wait for data, so an answer that trickles in (a byte a second)
    would never time out, and the thread waiting for it (a worker's, the scheduler's) would wait
    for as long as the server likes. The timeout is also the whole answer's limit.
    """
    chunks: list[bytes] = []
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise urllib3.exceptions.ReadTimeoutError(
                        None,  # type: ignore[arg-type]  # the pool: not needed for the message
                        "",
                        "the answer did not arrive within the read timeout",
                    )
                # No single wait for data outlasts the deadline. The connection is looked up
                # each time: urllib3 gives it back to the pool once the body is read whole.
                sock = getattr(answer.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(left)
            chunk = answer.read1(_READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        answer.close()  # not back to the pool: the rest of the body may still come
        answer.release_conn()  # but its slot is
        raise
    answer.release_conn()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _as_httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """urllib3's (and http.client's) failure as the httpx error httpcore would have raised.

    Messages never quote the request: http.client's header checks repeat the offending value,
    which may be an Authorization header.
    """
    errors = urllib3.exceptions
    if isinstance(exc, errors.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    kind: type[httpx.TransportError]
    if isinstance(exc, errors.NewConnectionError | errors.SSLError):
        kind, text = httpx.ConnectError, str(exc)
    elif isinstance(exc, errors.ConnectTimeoutError):
        kind, text = httpx.ConnectTimeout, str(exc)
    elif isinstance(exc, errors.ReadTimeoutError):
        kind, text = httpx.ReadTimeout, str(exc)
    elif isinstance(exc, errors.ProxyError):
        kind, text = httpx.ProxyError, str(exc)
    elif isinstance(exc, errors.LocationValueError):
        kind, text = httpx.UnsupportedProtocol, str(exc)
    elif isinstance(exc, errors.ProtocolError | OSError):
        kind, text = httpx.ReadError, str(exc)
    elif isinstance(exc, ValueError):
        kind = httpx.LocalProtocolError
        text = f"the request could not be sent ({type(exc).__name__})"
    else:
        kind, text = httpx.TransportError, f"{type(exc).__name__}: {exc}"
    return kind(text, request=request)


class _NoCookies(httpx.Cookies):
    """A cookie store that stores nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class ApiClient(httpx.Client):
    """An httpx.Client for the two token-authenticated JSON APIs: it keeps no cookies, and its
    answers are freed as soon as they are dropped.

    Both APIs authenticate every request with a bearer token and answer with no session, so a
    Set-Cookie from one answer is neither stored nor sent with the next request (one client serves
    every customer of a process). It also saves CPU: httpx parses every answer's cookies through
    urllib's compatibility objects, about 45 us per request, 11 % of a request's client CPU.

    httpx binds each answer's body stream to the answer (to set `elapsed` when it closes): a
    reference cycle, so every answer, with its request, URL and headers (23 objects), waited for
    the cyclic garbage collector; that was most of a worker's garbage (about 90 objects per
    customer). Once an answer is read (every call but `stream=True`) its stream is spent: `send`
    swaps it for an unbound stream over the same bytes, and the answer dies by reference counting.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._answer_cookies_ignored = _NoCookies()

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return self._answer_cookies_ignored

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        if cookies:
            raise ValueError("this client keeps no cookies")

    def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        response = super().send(request, stream=stream, **kwargs)
        if not stream:  # read and closed: the bound stream has done its work
            response.stream = httpx.ByteStream(response.content)
        return response


def new_http_client(
    *,
    timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
    max_connections: int = 100,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """One pooled client per process, with explicit timeouts, no redirects and no cookies.

    Redirects are refused because a bearer token must never follow a Location header to
    another host; neither API redirects in its contract. Requests go through a
    `PooledTransport` unless `transport` is given (tests pass httpx.MockTransport).
    """
    return ApiClient(
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        transport=transport or PooledTransport(max_connections=max_connections),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
    )


class RetryableAnswer(Exception):
    """A transient HTTP answer (429/5xx), raised inside an attempt so that tenacity retries it."""

    def __init__(
        self, status: int, code: str | None, message: str, retry_after_s: float | None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(f"HTTP {status}{f' {code}' if code else ''}: {message}")


def parse_retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait according to Retry-After (delta-seconds or HTTP-date), or None if absent.

    An HTTP-date is measured against the answer's own Date header when there is one, so that a
    skewed local clock does not turn "in 5 seconds" into "an hour ago".
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    server_date = response.headers.get("Date")
    if server_date:
        try:
            now = parsedate_to_datetime(server_date)
        except (TypeError, ValueError, IndexError):
            now = datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def shorten(text: str) -> str:
    """One line of at most MAX_SERVER_MESSAGE_CHARS characters that UTF-8 can encode."""
    line = " ".join(text.split())
    # JSON may carry lone surrogates ("\udc80"): no header, report or log file can hold them, and
    # an AMQP header that cannot be encoded fails the publish of the report or the parked copy.
    line = line.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    if len(line) > MAX_SERVER_MESSAGE_CHARS:
        return line[: MAX_SERVER_MESSAGE_CHARS - 3] + "..."
    return line


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every known secret value in a server's text, in case it echoes what we sent.

    Also in the form-encoded spellings a server may echo from a token request's body.
    """
    for secret in secrets:
        if secret:
            for spelling in (secret, quote_plus(secret), quote(secret, safe="")):
                text = text.replace(spelling, "***")
    return text


def server_text(text: str, secrets: Iterable[str] = ()) -> str:
    """A server's text made safe to show: secrets redacted first, then shortened.

    In that order: shortening reflows whitespace and cuts at a length limit, and a secret
    reflowed or cut in half would no longer be found, yet still be (partly) shown.
    """
    return shorten(redact(text, secrets))


def is_sendable_token(value: str) -> bool:
    """Whether `value` can be sent as a bearer token (no whitespace, controls or non-ASCII)."""
    return _SENDABLE_TOKEN.fullmatch(value) is not None


def body_text(response: httpx.Response, secrets: Iterable[str] = ()) -> str:
    """The answer's body as short text (secrets redacted), or its reason phrase when empty."""
    text = server_text(response.text, secrets) if response.content else ""
    return text or response.reason_phrase or "no message"


def parse_json(response: httpx.Response, *, call: str, customer_id: str | None) -> Any:
    """The JSON body of a successful answer; anything else is a PermanentError.

    A 200 that is not JSON must never read as "no users": the safety guard downstream relies on
    a broken answer failing loudly.
    """
    content = response.content
    try:
        # pydantic-core's parser (about 35 % less CPU than json.loads) accepts a strict subset of
        # what json.loads accepts, with the same values; json.loads takes what it refuses (a
        # UTF-8 BOM, UTF-16, lone surrogates) and names what is wrong with the rest.
        return pydantic_core.from_json(content)
    except ValueError:
        pass
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise PermanentError(
            f"malformed response: body is not JSON ({reason}, {len(response.content)} bytes)",
            customer_id=customer_id,
            call=call,
            status=response.status_code,
        ) from None


def validated_page(
    response: httpx.Response, adapter: TypeAdapter[_T], context: dict[str, Any] | None = None
) -> _T | None:
    """A page parsed and validated in one pass by pydantic-core, or None if it does not validate.

    For the list pages of both APIs this costs about half the CPU of json.loads and validating
    each item from Python objects. None sends the caller down its item-by-item path, which
    accepts exactly the same pages and names the item and field of any problem: the fast path
    decides nothing on its own.
    """
    try:
        return adapter.validate_json(response.content, context=context)
    except ValidationError:
        return None


# A list that points to yet another page after this many empty ones in a row is not ending: a
# next link or cursor that changes each time (a counter in it) would page forever.
MAX_EMPTY_PAGES = 5


def malformed(
    problem: str, *, call: str, customer_id: str | None, status: int | None = None
) -> PermanentError:
    """The error for an answer that is JSON but not the shape the contract promises."""
    return PermanentError(
        f"malformed response: {problem}", customer_id=customer_id, call=call, status=status
    )


class HttpApiClient:
    """Base of the API clients: the pooled httpx client they were given, or one of their own.

    A client passed in belongs to its owner (the composition root shares one per process);
    one created here is closed by `close()`.
    """

    def __init__(self, http: httpx.Client | None) -> None:
        self._owns_http = http is None
        self._http = http if http is not None else new_http_client()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def send_with_retry(
    send: Callable[[], httpx.Response],
    *,
    call: str,
    customer_id: str | None,
    policy: RetryPolicy,
    describe: Describe,
    logger: logging.Logger = _log,
    passthrough: Collection[int] = (),
) -> httpx.Response:
    """Send one request until it gets a final answer, and return that answer if it is a success.

    Transient failures (timeouts, transport errors, 429, 5xx) are retried under `policy`; once the
    policy is spent they become a TransientError that names the call, the customer, the number of
    attempts and the last thing the server said. Other non-2xx answers become a PermanentError at
    once, except the statuses in `passthrough`, which are returned for the caller to handle
    (ShareFile's 401 means "re-authenticate", not "give up").
    """

    # Calls are named "<METHOD> <api> <what>": the api label of the metrics.
    api = call.split(" ")[1] if call.count(" ") else "unknown"

    def attempt() -> httpx.Response:
        try:
            with metrics.timed_http(api) as timing:
                response = send()
                timing.status = response.status_code
        except httpx.LocalProtocolError:
            # Not chained and not quoted: h11's message repeats the offending header, which may
            # be an Authorization header.
            raise PermanentError(
                "the request could not be sent (LocalProtocolError: an invalid header?)",
                customer_id=customer_id,
                call=call,
            ) from None
        except UnicodeEncodeError:
            # httpx encodes header values as ASCII; the error holds the whole value.
            raise PermanentError(
                "the request could not be sent (a header value is not ASCII)",
                customer_id=customer_id,
                call=call,
            ) from None
        except PERMANENT_TRANSPORT_ERRORS as exc:
            raise PermanentError(
                f"{type(exc).__name__}: {exc}", customer_id=customer_id, call=call
            ) from exc
        except httpx.DecodingError as exc:
            raise malformed(
                f"body could not be decoded ({exc})", call=call, customer_id=customer_id
            ) from exc
        status = response.status_code
        if 200 <= status < 300 or status in passthrough:
            return response
        code, message = describe(response)
        if status in RETRYABLE_STATUSES:
            raise RetryableAnswer(status, code, message, parse_retry_after(response))
        raise PermanentError(message, customer_id=customer_id, call=call, status=status, code=code)

    started = policy.clock()
    # Most calls succeed at once: the first attempt runs without the retry machinery (building
    # a tenacity Retrying and its closures for every call cost ~4% of a worker's CPU). A first
    # failure is replayed as tenacity's first attempt, so policy, waits and logs are unchanged.
    first_failure: BaseException | None = None
    try:
        return attempt()
    except (RetryableAnswer, httpx.TransportError) as exc:
        first_failure = exc

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableAnswer) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, policy.max_retry_after_s)
        return policy.backoff(state.attempt_number)

    def stop(state: RetryCallState) -> bool:
        if state.attempt_number >= policy.attempts:
            return True
        # Stop *before* a wait that would end past the budget: waiting only to give up is waste.
        return policy.clock() - started + state.upcoming_sleep > policy.total_seconds

    def log_retry(state: RetryCallState) -> None:
        metrics.http_retry(api)
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s for customer %s: attempt %d/%d failed (%s); retrying in %.2fs",
            call,
            customer_id or "-",
            state.attempt_number,
            policy.attempts,
            describe_failure(exc),
            state.upcoming_sleep,
        )

    def give_up(state: RetryCallState) -> NoReturn:
        exc = state.outcome.exception() if state.outcome else None
        elapsed = policy.clock() - started
        status = exc.status if isinstance(exc, RetryableAnswer) else None
        code = exc.code if isinstance(exc, RetryableAnswer) else None
        last = exc.message if isinstance(exc, RetryableAnswer) else describe_failure(exc)
        limit = (
            f"attempt limit {policy.attempts}"
            if state.attempt_number >= policy.attempts
            else f"the next wait of {state.upcoming_sleep:.1f}s would pass "
            f"the {policy.total_seconds:g}s budget"
        )
        raise TransientError(
            f"gave up after {state.attempt_number} attempt(s) in {elapsed:.1f}s ({limit}); "
            f"last: {last}",
            customer_id=customer_id,
            call=call,
            status=status,
            code=code,
        ) from exc

    retrying = Retrying(
        retry=retry_if_exception(
            lambda exc: isinstance(exc, RetryableAnswer | httpx.TransportError)
        ),
        wait=wait,
        stop=stop,
        sleep=policy.sleep,
        before_sleep=log_retry,
        retry_error_callback=give_up,
    )

    def attempts() -> httpx.Response:
        nonlocal first_failure
        if first_failure is not None:
            failure, first_failure = first_failure, None
            raise failure
        return attempt()

    response: httpx.Response = retrying(attempts)
    return response


def describe_failure(exc: BaseException | None) -> str:
    """A short, secret-free description of why an attempt failed."""
    if exc is None:
        return "unknown failure"
    if isinstance(exc, RetryableAnswer):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
