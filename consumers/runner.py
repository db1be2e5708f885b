"""The one shared runner: decode → handler → publish outputs → ack, and every failure's fate.

Outcomes map to acknowledgements here and nowhere else (as FastStream's Ack/Nack/Reject):
success → publish the handler's outputs, wait for their confirms, ack; an invalid message or a
PermanentError → publish the handler's give-up outputs, park the message with the reason, ack;
a TransientError → delayed retry through the queue's retry queue, or give up after
`max_attempts`; a broker failure while publishing → requeue (the outputs may be published again,
which the handlers' deterministic ids make harmless).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from adapters import metrics
from adapters.broker import Broker, Delivery, Outgoing, attempt_of
from adapters.topology import (
    ATTEMPT_HEADER,
    FROM_QUEUE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    QueueSpec,
    Topology,
)
from domain.errors import InvalidMessage, PermanentError, SfsyncError, TransientError
from domain.messages import Envelope, decode

log = logging.getLogger("sfsync.runner")

# Parking headers are read by people; keep them readable and bounded.
MAX_REASON_CHARS = 500


class Handler(Protocol):
    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        """Do the work of one message; return the messages to publish."""
        ...

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        """The messages that report a message as failed for good (before it is parked)."""
        ...


class Outcome(StrEnum):
    ACKED = "acked"
    RETRIED = "retried"
    PARKED = "parked"
    REQUEUED = "requeued"


@dataclass
class MessageRunner:
    broker: Broker
    topology: Topology
    handler: Handler
    max_attempts: int = 5

    def __post_init__(self) -> None:
        self.counts: Counter[Outcome] = Counter()
        self._counts_lock = threading.Lock()

    def process(self, delivery: Delivery) -> Outcome:
        started = time.perf_counter()
        outcome = self._process(delivery)
        metrics.message_outcome(delivery.type, outcome.value, time.perf_counter() - started)
        with self._counts_lock:
            self.counts[outcome] += 1
        return outcome

    def _process(self, delivery: Delivery) -> Outcome:
        try:
            message = decode(delivery.body)
        except PermanentError as exc:
            log.warning("parking undecodable message from %s: %s", delivery.queue, exc.detail)
            return self._park(delivery, f"invalid message: {exc.detail}")
        context = {"correlation_id": message.correlation_id, "message_id": str(message.message_id)}
        try:
            outputs = self.handler.handle(message)
        except TransientError as exc:
            attempt = attempt_of(delivery) + 1
            if attempt < self.max_attempts:
                log.warning(
                    "%s failed (attempt %d of %d), retrying later: %s",
                    message.type,
                    attempt,
                    self.max_attempts,
                    exc,
                    extra=context,
                )
                return self._retry(delivery, attempt, str(exc))
            log.error(
                "%s failed %d times, giving up: %s", message.type, attempt, exc, extra=context
            )
            return self._give_up(delivery, message, exc, f"gave up after {attempt} attempts")
        except InvalidMessage as exc:
            # Valid JSON of a type this queue does not take (a misrouted event, say).
            log.warning("parking %s: %s", message.type, exc.detail, extra=context)
            return self._give_up(delivery, message, exc, "invalid message")
        except PermanentError as exc:
            log.error("%s failed permanently: %s", message.type, exc, extra=context)
            return self._give_up(delivery, message, exc, "permanent error")
        except Exception as exc:
            # A bug in a handler must not kill the worker or loop forever: park, loudly.
            log.exception("%s crashed the handler", message.type, extra=context)
            error = PermanentError(f"internal error: {type(exc).__name__}: {exc}")
            return self._give_up(delivery, message, error, "internal error")
        return self._finish(delivery, [Outgoing.of(m) for m in outputs])

    def _give_up(
        self, delivery: Delivery, message: Envelope[Any], error: SfsyncError, why: str
    ) -> Outcome:
        try:
            reports = [Outgoing.of(m) for m in self.handler.on_give_up(message, error)]
        except Exception:
            log.exception("on_give_up failed for %s; parking without a report", message.type)
            reports = []
        try:
            self.broker.publish(reports)
        except TransientError as exc:
            log.warning("could not publish the failure report (%s); requeueing", exc)
            delivery.requeue()
            return Outcome.REQUEUED
        return self._park(delivery, f"{why}: {error}")

    def _retry(self, delivery: Delivery, attempt: int, reason: str) -> Outcome:
        retry = self._copy(
            delivery, self.topology.retry_queue(delivery.queue), attempt=attempt, reason=reason
        )
        return self._finish(delivery, [retry], success=Outcome.RETRIED)

    def _park(self, delivery: Delivery, reason: str) -> Outcome:
        # The attempt header of a parked message counts every failed handling, this one too.
        parked = self._copy(
            delivery,
            self.topology.dead_queue(delivery.queue),
            attempt=attempt_of(delivery) + 1,
            reason=reason,
        )
        return self._finish(delivery, [parked], success=Outcome.PARKED)

    def _finish(
        self, delivery: Delivery, outputs: list[Outgoing], success: Outcome = Outcome.ACKED
    ) -> Outcome:
        try:
            self.broker.publish(outputs)
        except TransientError as exc:
            log.warning("publishing failed (%s); the message goes back to its queue", exc)
            delivery.requeue()
            return Outcome.REQUEUED
        delivery.ack()
        return success

    @staticmethod
    def _copy(delivery: Delivery, queue: str, *, attempt: int, reason: str) -> Outgoing:
        headers = dict(delivery.headers)
        headers.update(
            {
                ATTEMPT_HEADER: attempt,
                # Error texts may quote anything (lone surrogates included): keep it encodable.
                REASON_HEADER: reason[:MAX_REASON_CHARS]
                .encode("utf-8", "backslashreplace")
                .decode("utf-8"),
                FROM_QUEUE_HEADER: delivery.queue,
                ROUTING_KEY_HEADER: delivery.routing_key,
            }
        )
        return Outgoing(
            routing_key=queue,
            body=delivery.body,
            message_id=delivery.message_id or "",
            correlation_id=delivery.correlation_id or "",
            type=delivery.type or "",
            headers=headers,
            exchange="",
        )


class QueueConsumer:
    """Consumes one queue with `concurrency` worker threads (prefetch = concurrency).

    Deliveries arrive on the broker's thread and are handed to the pool at once, so the broker's
    I/O (and its heartbeats) never waits on a handler.
    """

    def __init__(self, broker: Broker, queue: QueueSpec, runner: MessageRunner, concurrency: int):
        self.broker = broker
        self.queue = queue
        self.runner = runner
        self.concurrency = max(1, concurrency)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=queue.name)
        self._in_flight = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        self.broker.consume(self.queue, self._on_delivery, prefetch=self.concurrency)

    def stop(self) -> None:
        """Stop taking messages, let in-flight ones finish (publish + ack), then return."""
        self.broker.cancel(self.queue.name)
        self._pool.shutdown(wait=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._idle:
            self._in_flight += 1
        try:
            self._pool.submit(self._run, delivery)
        except RuntimeError:
            # The pool is shutting down: give the message back for another consumer.
            delivery.requeue()
            self._done()

    def _run(self, delivery: Delivery) -> None:
        try:
            self.runner.process(delivery)
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()
