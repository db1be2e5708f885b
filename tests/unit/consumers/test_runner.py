"""The shared runner maps every outcome of a handler to the right acknowledgement."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.broker import Outgoing
from adapters.memory import MemoryBroker
from adapters.topology import ATTEMPT_HEADER, REASON_HEADER, Topology
from consumers.runner import MessageRunner, Outcome, QueueConsumer
from domain.errors import PermanentError, SfsyncError, TransientError
from domain.messages import Envelope, SyncCommand, SyncFailed, decode
from domain.report import SyncReport
from tests.fakes import fixed_stamper

STAMP = fixed_stamper()


def command(customer: str = "c1") -> bytes:
    return STAMP(SyncCommand(customer_id=customer, run_id="r1"), correlation_id="r1").to_json()


class ScriptedHandler:
    """Raises the scripted errors in turn, then succeeds with one sync.completed."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        report = SyncReport(
            customer_id=message.payload.customer_id, run_id="r1", outcome="completed"
        )
        from domain.messages import report_payload

        return [STAMP(report_payload(report), correlation_id="r1")]

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        failed = SyncFailed(
            customer_id=message.payload.customer_id, run_id="r1", outcome="failed", error=str(error)
        )
        return [STAMP(failed, correlation_id="r1")]


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker(Topology(prefix="t", retry_delay_ms=50))
    b.start()
    # A listener for events, so that tests can read what the runner published.
    from adapters.topology import QueueSpec

    b._declare(QueueSpec("t.events", ("sync.completed", "sync.failed")))
    yield b
    b.close()


def run(
    broker: MemoryBroker, handler: ScriptedHandler, body: bytes, max_attempts: int = 3
) -> list[Outcome]:
    runner = MessageRunner(broker, broker.topology, handler, max_attempts=max_attempts)
    consumer = QueueConsumer(broker, broker.topology.queues()[0], runner, concurrency=1)
    broker.publish([Outgoing("sync.command", body, "m1", "r1", "sync.command")])
    consumer.start()
    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert broker.depth("t.sync") == 0 and broker.depth("t.sync.retry") == 0
            assert consumer.wait_idle(0)
            assert sum(runner.counts.values()) >= 1
            assert runner.counts[Outcome.RETRIED] == sum(runner.counts.values()) - 1
    consumer.stop()
    return list(runner.counts.elements())


def events(broker: MemoryBroker) -> list[str]:
    return [json.loads(body)["type"] for body, _ in broker.messages("t.events")]


def test_success_publishes_the_outputs_and_acks(broker: MemoryBroker) -> None:
    outcomes = run(broker, ScriptedHandler(), command())
    assert outcomes == [Outcome.ACKED]
    assert events(broker) == ["sync.completed"]


def test_undecodable_message_is_parked_with_the_reason(broker: MemoryBroker) -> None:
    handler = ScriptedHandler()
    outcomes = run(broker, handler, b"\xff not json")
    assert outcomes == [Outcome.PARKED]
    assert handler.calls == 0
    [(body, headers)] = broker.messages("t.sync.dead")
    assert body == b"\xff not json"
    assert headers[REASON_HEADER].startswith("invalid message: body is not UTF-8")


def test_transient_error_is_retried_later_then_succeeds(broker: MemoryBroker) -> None:
    handler = ScriptedHandler(TransientError("503", customer_id="c1"))
    outcomes = run(broker, handler, command())
    assert sorted(outcomes) == sorted([Outcome.RETRIED, Outcome.ACKED])
    assert handler.calls == 2
    assert events(broker) == ["sync.completed"]


def test_transient_errors_past_max_attempts_report_failure_and_park(broker: MemoryBroker) -> None:
    handler = ScriptedHandler(*(TransientError("503", customer_id="c1") for _ in range(5)))
    outcomes = run(broker, handler, command(), max_attempts=3)
    assert outcomes.count(Outcome.RETRIED) == 2 and outcomes.count(Outcome.PARKED) == 1
    assert handler.calls == 3
    assert events(broker) == ["sync.failed"]
    [(_, headers)] = broker.messages("t.sync.dead")
    assert headers[ATTEMPT_HEADER] == 3
    assert "gave up after 3 attempts" in headers[REASON_HEADER]


def test_permanent_error_reports_failure_and_parks_at_once(broker: MemoryBroker) -> None:
    handler = ScriptedHandler(PermanentError("not_found", customer_id="c1", status=404))
    assert run(broker, handler, command()) == [Outcome.PARKED]
    assert handler.calls == 1
    assert events(broker) == ["sync.failed"]
    failed = decode(broker.messages("t.events")[0][0]).payload
    assert "not_found" in failed.error


def test_a_crashing_handler_parks_the_message_instead_of_killing_the_worker(
    broker: MemoryBroker,
) -> None:
    handler = ScriptedHandler(ZeroDivisionError("bug"))
    assert run(broker, handler, command()) == [Outcome.PARKED]
    [(_, headers)] = broker.messages("t.sync.dead")
    assert "internal error: ZeroDivisionError" in headers[REASON_HEADER]


class FailingPublishBroker(MemoryBroker):
    def __init__(self, topology: Topology, failures: int) -> None:
        super().__init__(topology)
        self.failures = failures

    def publish(self, messages: Sequence[Outgoing]) -> None:
        if self.failures and messages:
            self.failures -= 1
            raise TransientError("connection to RabbitMQ lost", call="publish")
        super().publish(messages)


def test_outputs_that_cannot_be_published_send_the_message_back_to_its_queue() -> None:
    broker = FailingPublishBroker(Topology(prefix="t", retry_delay_ms=50), failures=0)
    broker.start()
    try:
        broker.publish([Outgoing("sync.command", command(), "m1", "r1", "sync.command")])
        broker.failures = 1
        handler = ScriptedHandler()
        runner = MessageRunner(broker, broker.topology, handler)
        consumer = QueueConsumer(broker, broker.topology.queues()[0], runner, concurrency=1)
        consumer.start()
        for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
            with attempt:
                assert runner.counts[Outcome.ACKED] == 1
        consumer.stop()
        assert runner.counts[Outcome.REQUEUED] == 1
        assert handler.calls == 2  # handled again after the requeue: handlers are idempotent
    finally:
        broker.close()


class RefusingBroker(MemoryBroker):
    """Refuses for good every batch holding a message of a refused type (as AmqpBroker refuses
    one over the broker's size limit)."""

    def __init__(self, topology: Topology, refused: set[str]) -> None:
        super().__init__(topology)
        self.refused = refused

    def publish(self, messages: Sequence[Outgoing]) -> None:
        if any(m.type in self.refused for m in messages):
            raise PermanentError("a message over the broker's size limit", call="publish")
        super().publish(messages)


@pytest.mark.parametrize(
    ("refused", "reports", "reason"),
    [
        ({"sync.completed"}, ["sync.failed"], "outputs refused: publish: a message over"),
        ({"sync.completed", "sync.failed"}, [], "and its failure report was refused"),
    ],
)
def test_outputs_refused_for_good_report_the_failure_and_park_instead_of_looping(
    refused: set[str], reports: list[str], reason: str
) -> None:
    broker = RefusingBroker(Topology(prefix="t", retry_delay_ms=50), refused)
    broker.start()
    try:
        from adapters.topology import QueueSpec

        broker._declare(QueueSpec("t.events", ("sync.completed", "sync.failed")))
        handler = ScriptedHandler()
        assert run(broker, handler, command()) == [Outcome.PARKED]
        assert handler.calls == 1  # not handled again: it would only be refused again
        assert events(broker) == reports
        [(_, headers)] = broker.messages("t.sync.dead")
        assert reason in headers[REASON_HEADER]
    finally:
        broker.close()


def test_an_invalid_event_on_a_listeners_queue_is_dropped_not_sent_to_a_missing_dead_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run tracker's queue has no parking queue: a copy sent to "<queue>.dead" would vanish
    # unroutable while the outcome said "parked".
    broker = MemoryBroker(Topology(prefix="t", retry_delay_ms=50))
    broker.start()
    try:
        listener = broker.topology.listener_queue("run.r1")
        handler = ScriptedHandler()
        runner = MessageRunner(broker, broker.topology, handler, can_park=False)
        consumer = QueueConsumer(broker, listener, runner, concurrency=1)
        consumer.start()
        broker.publish([Outgoing("sync.completed", b"\xff not json", "m1", "r1", "sync.completed")])
        for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
            with attempt:
                assert runner.counts[Outcome.DROPPED] == 1
        consumer.stop()
        assert handler.calls == 0 and sum(runner.counts.values()) == 1
        assert broker.depth(listener.name) == 0
        assert "dropping a message from t.run.r1, which has no parking queue" in caplog.text
    finally:
        broker.close()


class DyingWorkersBroker(MemoryBroker):
    """The first `deaths` deliveries go to workers that die holding them: back to the queue."""

    def __init__(self, topology: Topology, deaths: int) -> None:
        super().__init__(topology)
        self.deaths = deaths

    def consume(self, queue: Any, on_delivery: Any, prefetch: int) -> None:
        def die_first(delivery: Any) -> None:
            if self.deaths:
                self.deaths -= 1
                delivery.requeue()
                return
            on_delivery(delivery)

        super().consume(queue, die_first, prefetch)


@pytest.mark.parametrize(("deaths", "handled"), [(2, False), (1, True), (0, True)])
def test_the_last_delivery_a_work_queue_allows_is_reported_and_parked_not_handled(
    deaths: int, handled: bool
) -> None:
    # Handled once more and lost once more, it would be parked by the queue's delivery limit,
    # silently: no reason header, and no failure report for `sfsync sync` to wait for.
    broker = DyingWorkersBroker(Topology(prefix="t", retry_delay_ms=50, delivery_limit=2), deaths)
    broker.start()
    try:
        from adapters.topology import QueueSpec

        broker._declare(QueueSpec("t.events", ("sync.completed", "sync.failed")))
        handler = ScriptedHandler()
        outcomes = run(broker, handler, command())
        assert handler.calls == int(handled)
        if handled:
            assert outcomes == [Outcome.ACKED]
            assert events(broker) == ["sync.completed"]
            return
        assert outcomes == [Outcome.PARKED]
        assert events(broker) == ["sync.failed"]
        assert (
            "2 earlier deliveries all ended without an ack"
            in decode(broker.messages("t.events")[0][0]).payload.error
        )
        [(_, headers)] = broker.messages("t.sync.dead")
        assert headers[REASON_HEADER].startswith("delivery limit: its 2 earlier deliveries")
        assert "x-delivery-count" not in headers  # the work queue's count, not the copy's
    finally:
        broker.close()


def test_stopping_puts_back_the_deliveries_taken_but_not_started() -> None:
    # They used to be handled first: a SIGTERM (or a run's deadline) waited for the APIs of
    # every prefetched message, and a stop during a broker outage took minutes.
    import threading

    release = threading.Event()

    class BlockingHandler(ScriptedHandler):
        def __init__(self) -> None:
            super().__init__()
            self.started = 0

        def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
            self.started += 1
            release.wait(10)
            return super().handle(message)

    broker = MemoryBroker(Topology(prefix="t", retry_delay_ms=50))
    broker.start()
    try:
        handler = BlockingHandler()
        runner = MessageRunner(broker, broker.topology, handler)
        consumer = QueueConsumer(broker, broker.topology.queues()[0], runner, 1, headroom=2)
        broker.publish(
            [
                Outgoing("sync.command", command(f"c{n}"), f"m{n}", "r1", "sync.command")
                for n in range(3)
            ]
        )
        consumer.start()
        for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
            with attempt:  # one in the handler, two waiting in the inbox
                assert broker.depth("t.sync") == 0 and handler.started == 1
        stopping = threading.Thread(target=consumer.stop)
        stopping.start()
        for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
            with attempt:
                assert broker.depth("t.sync") == 2  # back in the queue, not handled
        release.set()
        stopping.join(10)
        assert not stopping.is_alive()
        assert handler.started == 1 and runner.counts[Outcome.ACKED] == 1
    finally:
        release.set()
        broker.close()
