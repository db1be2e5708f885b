"""Queue statistics from RabbitMQ: its management HTTP API, or a passive declare over AMQP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pika.exceptions

from adapters.amqp import redact_url
from adapters.topology import Topology
from domain.errors import TransientError

MANAGEMENT_TIMEOUT_S = 5.0
AMQP_TIMEOUT_S = 5.0
AMQP_NOT_FOUND = 404
# Only what `status` shows: the management API otherwise sends kilobytes per queue.
QUEUE_COLUMNS = (
    "name",
    "type",
    "messages_ready",
    "messages_unacknowledged",
    "consumers",
    "message_stats.publish_details.rate",
    "message_stats.deliver_get_details.rate",
)


class ManagementUnavailable(TransientError):
    """The management API did not answer usefully (absent plugin, refused, wrong credentials)."""


@dataclass(frozen=True)
class QueueStats:
    """One queue's depth and traffic; None where the source cannot tell."""

    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    publish_rate: float | None = None  # messages/s
    deliver_rate: float | None = None  # messages/s, deliveries and basic.get
    exists: bool = True


def management_target(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """The base URL without its credentials (safe to print), and the credentials as auth."""
    parsed = httpx.URL(url)
    auth = httpx.BasicAuth(parsed.username, parsed.password) if parsed.username else None
    bare = parsed.copy_with(username=None, password=None, query=None, fragment=None)
    return str(bare).rstrip("/"), auth


class ManagementClient:
    """Reads queue statistics of one vhost from the RabbitMQ management HTTP API."""

    def __init__(
        self,
        url: str,
        *,
        vhost: str = "/",
        timeout_s: float = MANAGEMENT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base, auth = management_target(url)
        self.display_url = base
        self.vhost = vhost
        # The credentials travel as an auth header, never in a URL that errors could print.
        self._client = httpx.Client(
            base_url=base, auth=auth, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def queues(self, prefix: str) -> list[QueueStats]:
        """Every queue of the deployment `prefix` in the vhost (Topology.owns), sorted by name."""
        path = f"/api/queues/{quote(self.vhost, safe='')}"
        try:
            response = self._client.get(path, params={"columns": ",".join(QUEUE_COLUMNS)})
        except httpx.HTTPError as exc:
            raise ManagementUnavailable(
                f"{type(exc).__name__}: {exc}", call=f"GET {self.display_url}{path}"
            ) from None
        if response.status_code != httpx.codes.OK:
            raise ManagementUnavailable(
                _refusal(response.status_code),
                call=f"GET {self.display_url}{path}",
                status=response.status_code,
            )
        try:
            rows = response.json()
        except ValueError:
            raise ManagementUnavailable(
                "the answer is not JSON (is this the management port?)",
                call=f"GET {self.display_url}{path}",
            ) from None
        if not isinstance(rows, list):
            raise ManagementUnavailable("unexpected answer: not a list of queues")
        ours = Topology(prefix).owns
        return sorted(
            (
                _from_management(row)
                for row in rows
                if isinstance(row, dict) and ours(str(row.get("name", "")))
            ),
            key=lambda q: q.name,
        )


def _refusal(status: int) -> str:
    if status == httpx.codes.UNAUTHORIZED:
        return "the management API refused the credentials"
    if status == httpx.codes.NOT_FOUND:
        return "no such vhost, or not a management API"
    return "the management API answered with an error"


def _from_management(row: Mapping[str, Any]) -> QueueStats:
    stats = row.get("message_stats") or {}
    # Counts appear a few seconds after a queue is declared (the stats interval): None until then.
    # Rates are 0 for a queue that never saw traffic: the API leaves message_stats out.
    return QueueStats(
        name=str(row["name"]),
        ready=_int_or_none(row.get("messages_ready")),
        unacked=_int_or_none(row.get("messages_unacknowledged")),
        consumers=_int_or_none(row.get("consumers")),
        publish_rate=_rate(stats, "publish_details"),
        deliver_rate=_rate(stats, "deliver_get_details"),
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rate(stats: Mapping[str, Any], key: str) -> float:
    details = stats.get(key)
    rate = details.get("rate") if isinstance(details, dict) else None
    return float(rate) if isinstance(rate, int | float) else 0.0


def passive_queue_stats(
    amqp_url: str, names: Iterable[str], *, timeout_s: float = AMQP_TIMEOUT_S
) -> list[QueueStats]:
    """Depth (ready only) and consumers of the named queues by a passive queue_declare.

    AMQP cannot list queues, nor tell unacked messages or rates: those stay None. A queue that
    does not exist is returned with `exists=False`.
    """
    params = pika.URLParameters(amqp_url)
    params.client_properties = {"connection_name": "sfsync-status"}
    params.connection_attempts = 1
    params.socket_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise TransientError(
            f"RabbitMQ did not answer: {type(exc).__name__}", call=f"AMQP {redact_url(amqp_url)}"
        ) from None
    try:
        found: list[QueueStats] = []
        channel = connection.channel()
        for name in names:
            try:
                ok = channel.queue_declare(name, passive=True).method
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != AMQP_NOT_FOUND:
                    raise
                # The broker closes the channel on a missing queue: carry on with a new one.
                found.append(
                    QueueStats(name=name, ready=None, unacked=None, consumers=None, exists=False)
                )
                channel = connection.channel()
                continue
            found.append(
                QueueStats(
                    name=name,
                    ready=int(ok.message_count),
                    unacked=None,
                    consumers=int(ok.consumer_count),
                    publish_rate=None,
                    deliver_rate=None,
                )
            )
        return found
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
