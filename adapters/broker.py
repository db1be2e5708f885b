"""What every broker adapter offers the roles: confirmed publishing and deliveries to ack."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.topology import ATTEMPT_HEADER, DELIVERY_COUNT_HEADER, QueueSpec
from domain.messages import Envelope


@dataclass(frozen=True)
class Outgoing:
    """One message to publish. `exchange=None` means the sfsync exchange; "" the default one."""

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str
    type: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    exchange: str | None = None

    @classmethod
    def of(cls, message: Envelope[Any]) -> Outgoing:
        return cls(
            routing_key=message.type,
            body=message.to_json(),
            message_id=str(message.message_id),
            correlation_id=message.correlation_id,
            type=message.type,
        )


class Delivery(Protocol):
    """A message handed to a consumer; exactly one of ack/requeue must follow."""

    body: bytes
    queue: str
    routing_key: str
    headers: Mapping[str, Any]
    redelivered: bool
    message_id: str | None
    correlation_id: str | None
    type: str | None

    def ack(self) -> None: ...

    def requeue(self) -> None: ...


def attempt_of(delivery: Delivery) -> int:
    """How many times this message has already failed transiently (0 on first delivery)."""
    value = delivery.headers.get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


def delivered_before(delivery: Delivery) -> int:
    """How many earlier deliveries of this message were not acked (RabbitMQ's count; 0 if none)."""
    value = delivery.headers.get(DELIVERY_COUNT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


class Broker(Protocol):
    def start(self) -> None:
        """Connect and declare the topology; raise ConfigError/TransientError if impossible."""
        ...

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Return once the broker has confirmed every message; TransientError otherwise."""
        ...

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        """Hand the messages over without waiting for their confirms. The future completes when
        the broker has confirmed every one, or fails (TransientError, PermanentError) when one
        was refused, could not be sent or was not confirmed in time: it always completes."""
        ...

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        """Declare `queue` if needed and hand its messages to `on_delivery`, at most `prefetch`
        unacknowledged at a time. `on_delivery` runs on the broker's thread: it must not block."""
        ...

    def cancel(self, queue: str) -> None:
        """Stop delivering from `queue`; deliveries already handed out may still be acked."""
        ...

    def close(self) -> None: ...

    def failure(self) -> BaseException | None:
        """The error that ended the broker for good (RabbitMQ refused the login or the topology,
        on a reconnect too); None while it works or reconnects. A role that finds one exits."""
        ...


def published_now(
    publish: Callable[[Sequence[Outgoing]], None], messages: Sequence[Outgoing]
) -> Future[None]:
    """`publish_async` for a broker whose `publish` is confirmed as soon as it returns."""
    confirmed: Future[None] = Future()
    try:
        publish(messages)
    except Exception as exc:  # noqa: BLE001 - every failure is the future's, as with a real broker
        confirmed.set_exception(exc)
    else:
        confirmed.set_result(None)
    return confirmed
