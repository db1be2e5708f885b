"""The one shared runner: decode → handler → publish outputs → ack, and every failure's fate.

Outcomes map to acknowledgements here and nowhere else (as FastStream's Ack/Nack/Reject):
success → publish the handler's outputs, ack once they are confirmed; an invalid message or a
PermanentError → publish the handler's give-up outputs, park the message with the reason, ack;
a TransientError → delayed retry through the queue's retry queue, or give up after
`max_attempts`; a broker failure while publishing → requeue after a pause that doubles with each
delivery (the outputs may be published again, which the handlers' deterministic ids make
harmless). A message on the last delivery its work queue's limit allows is reported as failed
and parked without being handled: every earlier handling ended without an ack, and another
would end with RabbitMQ parking it silently, without a reason or a failure report.

Confirms are awaited on the broker's thread, not the handler's: a handler thread is free for the
next delivery once it has handed over the outputs, and `process` returns a future of the outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from queue import Empty, SimpleQueue
from typing import Any, Protocol

from adapters import metrics
from adapters.broker import Broker, Delivery, Outgoing, attempt_of, delivered_before
from adapters.topology import (
    ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
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
# How long stop() waits for the confirms of messages already handled (the broker's own limit).
STOP_TIMEOUT_S = 60.0
# A message whose outputs could not be published goes back to its queue only after a pause, longer
# each time RabbitMQ has delivered it before (x-delivery-count): an immediate requeue is delivered
# again at once, and while a quorum queue elects a new leader RabbitMQ refuses every publish to it
# for seconds, so the work queue's delivery limit (20) dead-lettered messages within two seconds.
REQUEUE_DELAY_S = 0.5
MAX_REQUEUE_DELAY_S = 15.0


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
    DROPPED = "dropped"  # would be parked, but its queue (an event listener's) has no parking queue


@dataclass
class MessageRunner:
    broker: Broker
    topology: Topology
    handler: Handler
    max_attempts: int = 5
    requeue_delay_s: float = REQUEUE_DELAY_S
    max_requeue_delay_s: float = MAX_REQUEUE_DELAY_S
    # False for a listener's queue (a run tracker's), which has no parking queue: a copy sent to
    # "<queue>.dead" would vanish, unroutable. What would be parked is dropped, with a warning.
    can_park: bool = True

    def __post_init__(self) -> None:
        self.counts: Counter[Outcome] = Counter()
        self._counts_lock = threading.Lock()

    def process(self, delivery: Delivery) -> Future[Outcome]:
        """Handle one delivery and publish what it gives. Returns at once after that: the
        future completes with the outcome once the broker has confirmed those messages and the
        delivery is acked (or requeued), so the calling thread can take the next one meanwhile."""
        started = time.perf_counter()
        outcome = self._process(delivery)
        outcome.add_done_callback(partial(self._count, delivery.type, started))
        return outcome

    def _count(self, kind: str | None, started: float, done: Future[Outcome]) -> None:
        outcome = done.result()
        metrics.message_outcome(kind, outcome.value, time.perf_counter() - started)
        with self._counts_lock:
            self.counts[outcome] += 1

    def _process(self, delivery: Delivery) -> Future[Outcome]:
        try:
            message = decode(delivery.body)
        except PermanentError as exc:
            log.warning("parking undecodable message from %s: %s", delivery.queue, exc.detail)
            return self._park(delivery, f"invalid message: {exc.detail}")
        context = {"correlation_id": message.correlation_id, "message_id": str(message.message_id)}
        unsettled = delivered_before(delivery)
        if unsettled >= self.topology.delivery_limit:
            # The last delivery the work queue allows: every earlier one ended without an ack
            # (its worker died or lost its connection while handling it). Handled again and
            # lost again, RabbitMQ would park it silently; report it and park it with a reason.
            log.error(
                "%s was delivered %d times without being settled; giving up",
                message.type,
                unsettled,
                extra=context,
            )
            error = PermanentError(
                f"its {unsettled} earlier deliveries all ended without an ack (a worker died "
                "or lost its connection while handling it, or its outputs could not be sent)"
            )
            return self._give_up(delivery, message, error, "delivery limit")
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
        return self._finish(
            delivery,
            [Outgoing.of(m) for m in outputs],
            refused=lambda error: self._give_up(delivery, message, error, "outputs refused"),
        )

    def _give_up(
        self, delivery: Delivery, message: Envelope[Any], error: SfsyncError, why: str
    ) -> Future[Outcome]:
        try:
            reports = [Outgoing.of(m) for m in self.handler.on_give_up(message, error)]
        except Exception:
            log.exception("on_give_up failed for %s; parking without a report", message.type)
            reports = []

        def park(outcome: Future[Outcome]) -> None:
            _pass_on(self._park(delivery, f"{why}: {error}"), outcome)

        # The report first: a message is parked only once its failure has been reported.
        return self._after_confirms(
            delivery,
            reports,
            confirmed=park,
            failed_what="the failure report",
            refused=lambda refusal: self._park(
                delivery, f"{why}: {error} (and its failure report was refused: {refusal})"
            ),
        )

    def _retry(self, delivery: Delivery, attempt: int, reason: str) -> Future[Outcome]:
        retry = self._copy(
            delivery, self.topology.retry_queue(delivery.queue), attempt=attempt, reason=reason
        )
        return self._finish(delivery, [retry], success=Outcome.RETRIED)

    def _park(self, delivery: Delivery, reason: str) -> Future[Outcome]:
        if not self.can_park:
            # A listener sees copies of events: the work queues and the audit trail keep theirs.
            log.warning(
                "dropping a message from %s, which has no parking queue: %s", delivery.queue, reason
            )
            return self._finish(delivery, [], success=Outcome.DROPPED)
        # The attempt header of a parked message counts every failed handling, this one too.
        parked = self._copy(
            delivery,
            self.topology.dead_queue(delivery.queue),
            attempt=attempt_of(delivery) + 1,
            reason=reason,
        )
        return self._finish(delivery, [parked], success=Outcome.PARKED)

    def _finish(
        self,
        delivery: Delivery,
        outputs: list[Outgoing],
        success: Outcome = Outcome.ACKED,
        refused: Callable[[PermanentError], Future[Outcome]] | None = None,
    ) -> Future[Outcome]:
        def ack(outcome: Future[Outcome]) -> None:
            delivery.ack()
            outcome.set_result(success)

        return self._after_confirms(
            delivery, outputs, confirmed=ack, failed_what="its outputs", refused=refused
        )

    def _after_confirms(
        self,
        delivery: Delivery,
        outputs: list[Outgoing],
        confirmed: Callable[[Future[Outcome]], None],
        failed_what: str,
        refused: Callable[[PermanentError], Future[Outcome]] | None = None,
    ) -> Future[Outcome]:
        """Publish `outputs`; once confirmed, go on with `confirmed`, which completes the outcome.
        If they cannot be published the delivery goes back to its queue, to be handled again
        (the outputs may then be published twice, which the handlers' deterministic ids make
        harmless), unless the broker refused them for good (a message over its size limit) and
        `refused` says what to do instead: handling it again would only be refused again."""
        outcome: Future[Outcome] = Future()

        def then(error: BaseException | None) -> None:
            # On the broker's I/O thread (or here, if already settled): nothing here may block.
            if isinstance(error, PermanentError) and refused is not None:
                log.error("the broker refused %s for good: %s", failed_what, error)
                try:
                    _pass_on(refused(error), outcome)
                    return
                except Exception as exc:  # a bug here must not strand the delivery either
                    log.exception("giving up a message from %s failed", delivery.queue)
                    error = exc
            if error is None:
                try:
                    confirmed(outcome)
                    return
                except Exception as exc:  # a bug in the runner must not strand the delivery
                    log.exception("finishing %s failed", delivery.queue)
                    error = exc
            delay = self.requeue_delay(delivery)
            log.warning(
                "publishing %s failed (%s); the message goes back to its queue in %.1fs",
                failed_what,
                error,
                delay,
            )
            self._requeue_later(delivery, delay, outcome)

        if outputs:
            self.broker.publish_async(outputs).add_done_callback(lambda p: then(p.exception()))
        else:
            then(None)  # nothing to publish, so nothing to wait for
        return outcome

    def requeue_delay(self, delivery: Delivery) -> float:
        """The pause before a delivery goes back to its queue: doubling with each delivery."""
        count = delivered_before(delivery)
        return min(self.max_requeue_delay_s, self.requeue_delay_s * 2.0 ** min(count, 30))

    @staticmethod
    def _requeue_later(delivery: Delivery, delay: float, outcome: Future[Outcome]) -> None:
        """Requeue after `delay` (the delivery keeps its prefetch slot meanwhile), then complete
        the outcome; nothing here blocks the calling thread (often the broker's I/O thread)."""

        def requeue() -> None:
            try:
                delivery.requeue()
            finally:
                outcome.set_result(Outcome.REQUEUED)

        if delay <= 0:
            requeue()
            return
        timer = threading.Timer(delay, requeue)
        timer.daemon = True  # at exit the broker requeues what is still unacknowledged
        timer.start()

    @staticmethod
    def _copy(delivery: Delivery, queue: str, *, attempt: int, reason: str) -> Outgoing:
        headers = dict(delivery.headers)
        # RabbitMQ's count of this queue's deliveries: a copy starts a count of its own.
        headers.pop(DELIVERY_COUNT_HEADER, None)
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


def _pass_on(source: Future[Outcome], target: Future[Outcome]) -> None:
    source.add_done_callback(lambda done: target.set_result(done.result()))


class QueueConsumer:
    """Consumes one queue with `concurrency` handler threads.

    Deliveries arrive on the broker's thread and go into an inbox at once, so the broker's I/O
    (and its heartbeats) never waits on a handler. A thread is free for the next delivery as
    soon as it has published a delivery's outputs: their confirms (and the ack) come later, on
    the broker's thread. The prefetch is therefore `concurrency` plus a `headroom` of deliveries
    that wait for their confirms (by default as many again: `default_headroom`), so that the
    threads still find work meanwhile.

    The inbox is a `queue.SimpleQueue` read by the threads themselves, not a ThreadPoolExecutor:
    a delivery already has its own completion (the outcome future), and the executor's Future,
    work item and semaphore per message cost the consume path about a tenth of its CPU.
    """

    def __init__(
        self,
        broker: Broker,
        queue: QueueSpec,
        runner: MessageRunner,
        concurrency: int,
        headroom: int | None = None,
    ):
        self.broker = broker
        self.queue = queue
        self.runner = runner
        self.concurrency = max(1, concurrency)
        self.prefetch = self.concurrency + (
            default_headroom(self.concurrency) if headroom is None else max(0, headroom)
        )
        self._inbox: SimpleQueue[Delivery | None] = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{queue.name}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        self._in_flight = 0
        self._stopping = False
        self._idle = threading.Condition()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self.broker.consume(self.queue, self._on_delivery, prefetch=self.prefetch)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop taking messages, let the ones taken finish (publish, confirms, ack), then
        return; after `timeout_s` without their confirms, leave them to the broker."""
        self.broker.cancel(self.queue.name)
        with self._idle:
            self._stopping = True
        # Deliveries taken but not started go back to the queue, for another consumer (or the
        # next start): handling them now would only make the stop (and a run's deadline) wait.
        while True:
            try:
                waiting = self._inbox.get_nowait()
            except Empty:
                break
            if waiting is not None:
                waiting.requeue()
                self._done()
        for _ in self._threads:
            self._inbox.put(None)  # after every delivery taken: each thread ends on one
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        if not self.wait_idle(timeout_s):
            log.warning(
                "stopping with %d messages from %s unconfirmed; RabbitMQ redelivers them",
                self._in_flight,
                self.queue.name,
            )

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._idle:
            if not self._stopping:
                self._in_flight += 1
                # Under the lock: stop() queues the threads' end markers after this delivery.
                self._inbox.put(delivery)
                return
        delivery.requeue()  # stopping: give the message back for another consumer

    def _work(self) -> None:
        while (delivery := self._inbox.get()) is not None:
            try:
                outcome = self.runner.process(delivery)
            except Exception:  # a bug in the runner: this thread must go on with the next one
                log.exception("handling a message from %s failed", self.queue.name)
                delivery.requeue()
                self._done()
                continue
            outcome.add_done_callback(self._done)

    def _done(self, _outcome: Future[Outcome] | None = None) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()


def default_headroom(concurrency: int) -> int:
    """Deliveries beyond the thread count that may wait for their confirms: as many again.

    A delivery holds its prefetch slot from arrival until its outputs are confirmed and it is
    acked, so the headroom must cover (messages per second) x (confirm-and-ack time). Measured
    in a busy worker (1 process x 32 threads, 2,000 customers, 20 ms per API call), that time was
    14 ms at the median, 37 ms at p90 and 65 ms at p99, against about 120 ms of handling: with a
    quarter (8) as headroom, the threads waited for a delivery 6-12 % of their time; with as many
    again (32), 1-2 %. A slower API only lengthens the handling, so the headroom stays enough.
    On a slower day (2026-11-29) the same worker's pika thread waited longer for the GIL: 42-80 ms
    at the median from a publish to its turn on that thread and 86-151 ms to its confirm, and the
    threads waited for a delivery 16-22 % of their time. Four times the headroom cut that wait to
    6.5-9 % but not the cycle (4 rounds alternating: 18.0 against 17.3 s at the median, within the
    machine's noise), as the process's one GIL, not the deliveries, bounds it (docs/performance.md).
    """
    return max(1, concurrency)
