"""Each role's own Prometheus metrics: one registry per process and a few one-line recorders.

Metrics (every name starts with ``sfsync_``; labels in brackets) and what records them:

- ``sfsync_messages_total{type, outcome}`` counter: ``message_outcome(type, outcome)``; outcome
  is the runner's ``acked`` | ``retried`` | ``parked`` | ``requeued`` | ``dropped``.
- ``sfsync_message_handling_seconds{type}`` histogram: ``message_outcome(..., seconds)``.
- ``sfsync_http_requests_total{api, status}`` counter: ``http_call(api, status)``; api is
  ``sm`` | ``sharefile``, status the HTTP code, or ``error`` when no answer came (None).
- ``sfsync_http_request_seconds{api}`` histogram: ``http_call(..., seconds)``, one attempt.
- ``sfsync_http_retries_total{api}`` counter: ``http_retry(api)``.
- ``sfsync_plan_items_total{action}`` counter: ``plan(provision=, deprovision=, held=)``.
- ``sfsync_held_plans_total`` counter: ``plan(held=N)`` with N > 0.

`type` is a message type of domain.messages (anything else is counted as "unknown", so a
stream of garbage cannot blow up the number of series). The module-level functions record into
the process's default `Metrics` (which also exports process_* metrics); tests build their own
`Metrics()` with a fresh registry. `start_metrics_server(port)` serves /metrics over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from domain.messages import PAYLOAD_TYPES

UNKNOWN_TYPE = "unknown"
HTTP_APIS = ("sm", "sharefile")
PLAN_ACTIONS = ("provision", "deprovision", "held")
# A sync of a large customer pages through thousands of users: handling can take minutes.
MESSAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every sfsync metric, registered in one registry (a fresh one unless given)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = False
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.messages = Counter(
            "sfsync_messages",
            "Messages handled, by message type and outcome "
            "(acked, retried, parked, requeued, dropped).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.message_seconds = Histogram(
            "sfsync_message_handling_seconds",
            "Time from delivery to acknowledgement of one message, by message type.",
            ["type"],
            buckets=MESSAGE_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "sfsync_http_requests",
            "HTTP calls to Services Manager (sm) and ShareFile, by HTTP status or 'error'.",
            ["api", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "sfsync_http_request_seconds",
            "Duration of one HTTP call (one attempt), by API.",
            ["api"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.http_retries = Counter(
            "sfsync_http_retries",
            "HTTP calls tried again in-process (5xx, 429, timeouts), by API.",
            ["api"],
            registry=self.registry,
        )
        self.plan_items = Counter(
            "sfsync_plan_items",
            "Plan items decided by reconcile, by action (provision, deprovision, held).",
            ["action"],
            registry=self.registry,
        )
        self.held_plans = Counter(
            "sfsync_held_plans",
            "Plans whose removals the safety guard held.",
            registry=self.registry,
        )
        # labels() validates and locks on every call: a recorder's children are looked up once.
        self._children: dict[tuple[str | None, ...], tuple[Counter, Histogram]] = {}
        self._plan_items = {
            action: self.plan_items.labels(action=action)
            for action in ("provision", "deprovision", "held")
        }

    def message_outcome(
        self, message_type: str | None, outcome: str, seconds: float | None = None
    ) -> None:
        """One message finished with `outcome` (a runner Outcome or its value)."""
        known = message_type in PAYLOAD_TYPES
        label = message_type if known else UNKNOWN_TYPE
        text = str(outcome)
        self._record(
            ("message", message_type, text),
            lambda: (
                self.messages.labels(type=label, outcome=text),
                self.message_seconds.labels(type=label),
            ),
            seconds,
            # Any other type is garbage from the wire (unbounded): counted, not kept.
            remember=known or message_type is None,
        )

    def http_call(self, api: str, status: int | None, seconds: float | None = None) -> None:
        """One HTTP attempt to `api` ("sm" or "sharefile"); status None = no answer (timeout…)."""
        text = "error" if status is None else str(status)
        self._record(
            ("http", api, text),
            lambda: (
                self.http_requests.labels(api=api, status=text),
                self.http_seconds.labels(api=api),
            ),
            seconds,
        )

    def _record(
        self,
        key: tuple[str | None, ...],
        children: Callable[[], tuple[Counter, Histogram]],
        seconds: float | None,
        *,
        remember: bool = True,
    ) -> None:
        """Count one event, and observe its duration if given, in the children for `key`."""
        found = self._children.get(key)
        if found is None:
            found = children()
            if remember:
                self._children[key] = found
        counter, histogram = found
        counter.inc()
        if seconds is not None:
            histogram.observe(seconds)

    def http_retry(self, api: str) -> None:
        """An HTTP call to `api` is about to be tried again."""
        self.http_retries.labels(api=api).inc()

    def plan(self, *, provision: int = 0, deprovision: int = 0, held: int = 0) -> None:
        """A plan was made: its item counts; held > 0 also counts one held plan."""
        items = self._plan_items  # once per customer: three labels() cost more than the rest
        items["provision"].inc(provision)
        items["deprovision"].inc(deprovision)
        items["held"].inc(held)
        if held > 0:
            self.held_plans.inc()

    @contextmanager
    def timed_http(self, api: str) -> Iterator[HttpTiming]:
        """`with metrics.timed_http("sm") as call: ...; call.status = response.status_code`."""
        timing = HttpTiming()
        started = perf_counter()
        try:
            yield timing
        finally:
            self.http_call(api, timing.status, perf_counter() - started)


@dataclass
class HttpTiming:
    """What `timed_http` records when its block ends; leave status None when no answer came."""

    status: int | None = None


_default: Metrics | None = None
_default_lock = threading.Lock()
_servers: dict[int, WSGIServer] = {}


def default_metrics() -> Metrics:
    """This process's metrics (created on first use, with process_* metrics)."""
    global _default
    if _default is not None:
        return _default
    with _default_lock:
        if _default is None:
            _default = Metrics(process_metrics=True)
        return _default


def message_outcome(message_type: str | None, outcome: str, seconds: float | None = None) -> None:
    default_metrics().message_outcome(message_type, outcome, seconds)


def http_call(api: str, status: int | None, seconds: float | None = None) -> None:
    default_metrics().http_call(api, status, seconds)


def http_retry(api: str) -> None:
    default_metrics().http_retry(api)


def plan(*, provision: int = 0, deprovision: int = 0, held: int = 0) -> None:
    default_metrics().plan(provision=provision, deprovision=deprovision, held=held)


def start_metrics_server(
    port: int,
    *,
    addr: str = "0.0.0.0",  # noqa: S104 - Prometheus scrapes from another host or container
    metrics: Metrics | None = None,
) -> int:
    """Serve GET /metrics on `port` (0: any free port) in a daemon thread; returns the port."""
    registry = (metrics or default_metrics()).registry
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_metrics_server(port: int) -> None:
    """Stop the server that start_metrics_server bound to `port` (no-op if none)."""
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


@contextmanager
def timed_http(api: str) -> Iterator[HttpTiming]:
    """The process-wide `Metrics.timed_http`."""
    with default_metrics().timed_http(api) as timing:
        yield timing
