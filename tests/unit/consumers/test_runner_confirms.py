"""The runner acks a delivery only once what it published is confirmed, without holding a thread.

A handler thread hands the outputs to the broker and goes on with the next delivery; the ack (or
the requeue) follows the confirm. These tests hold the confirms back to see each step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.broker import Delivery, Outgoing
from adapters.topology import QueueSpec, Topology
from consumers.runner import MessageRunner, Outcome, QueueConsumer, default_headroom
from domain.errors import PermanentError, TransientError
from domain.messages import Envelope
from tests.fakes import RecordedDelivery
from tests.unit.consumers.test_runner import ScriptedHandler, command

TOPOLOGY = Topology(prefix="t")


class HeldConfirms:
    """A broker whose confirms come only when the test releases them, in publish order."""

    def __init__(self) -> None:
        self.topology = TOPOLOGY
        self.batches: list[tuple[list[Outgoing], Future[None]]] = []
        self.prefetch: int | None = None
        self.on_delivery: Callable[[Delivery], None] | None = None

    def start(self) -> None: ...

    def publish(self, messages: Sequence[Outgoing]) -> None:
        raise AssertionError("the runner must not wait for confirms on its thread")

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        confirmed: Future[None] = Future()
        self.batches.append((list(messages), confirmed))
        return confirmed

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        self.prefetch, self.on_delivery = prefetch, on_delivery

    def cancel(self, queue: str) -> None: ...

    def close(self) -> None: ...

    def confirm(self, index: int, error: BaseException | None = None) -> None:
        confirmed = self.batches[index][1]
        if error is None:
            confirmed.set_result(None)
        else:
            confirmed.set_exception(error)

    def kinds(self, index: int) -> list[str]:
        return [m.routing_key for m in self.batches[index][0]]


def test_the_ack_waits_for_the_confirm_but_the_caller_does_not() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler())
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)

    assert broker.kinds(0) == ["sync.completed"]
    assert not outcome.done() and delivery.settled == []
    assert runner.counts == {}
    broker.confirm(0)
    assert outcome.result(timeout=0) is Outcome.ACKED
    assert delivery.settled == ["ack"]
    assert runner.counts == {Outcome.ACKED: 1}


def test_outputs_refused_by_the_broker_send_the_delivery_back() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler(), requeue_delay_s=0)
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    broker.confirm(0, TransientError("RabbitMQ rejected a publish", call="publish"))

    assert outcome.result(timeout=0) is Outcome.REQUEUED
    assert delivery.settled == ["requeue"]


def test_a_refused_publish_requeues_after_a_pause_not_at_once() -> None:
    # At once, RabbitMQ delivers the message again at once: while a quorum queue elected a new
    # leader and refused every publish, a worker went through the delivery limit (20) in two
    # seconds and RabbitMQ dead-lettered the commands (seen in the cluster suite's leader kill).
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler(), requeue_delay_s=0.3)
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    refused = time.monotonic()
    broker.confirm(0, TransientError("RabbitMQ rejected a publish", call="publish"))

    assert delivery.settled == [] and not outcome.done()  # still holding its prefetch slot
    assert outcome.result(timeout=5) is Outcome.REQUEUED
    assert time.monotonic() - refused >= 0.3
    assert delivery.settled == ["requeue"]


def test_the_pause_doubles_with_each_delivery_up_to_its_limit() -> None:
    runner = MessageRunner(
        HeldConfirms(), TOPOLOGY, ScriptedHandler(), requeue_delay_s=0.5, max_requeue_delay_s=15
    )

    def pause(headers: dict[str, Any]) -> float:
        return runner.requeue_delay(RecordedDelivery(command(), headers=headers))

    assert pause({}) == 0.5  # a first delivery (and any broker without the header)
    assert [pause({"x-delivery-count": n}) for n in (1, 2, 3, 5, 19)] == [1, 2, 4, 15, 15]
    assert pause({"x-delivery-count": "garbage"}) == 0.5
    # Twenty deliveries take minutes, not seconds, to reach the work queue's delivery limit.
    assert sum(pause({"x-delivery-count": n}) for n in range(20)) > 120


def test_outputs_refused_for_good_are_reported_as_a_failure_then_parked_not_lost() -> None:
    # A PermanentError from publishing (an output pika cannot encode, or one over the broker's
    # size limit) would fail again on every delivery: the message is given up at once, its
    # failure report first, then parked; the delivery is settled only after both are confirmed.
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler(), requeue_delay_s=0)
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    broker.confirm(0, PermanentError("message could not be encoded: ValueError"))
    assert broker.kinds(1) == ["sync.failed"]
    assert not outcome.done() and delivery.settled == []
    broker.confirm(1)
    assert broker.kinds(2) == ["t.sync.dead"]
    broker.confirm(2)

    assert outcome.result(timeout=0) is Outcome.PARKED
    assert delivery.settled == ["ack"]


def test_a_bug_while_giving_up_refused_outputs_requeues_instead_of_stranding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler(), requeue_delay_s=0)

    def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(runner, "_give_up", broken)
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    broker.confirm(0, PermanentError("message could not be encoded: ValueError"))

    assert outcome.result(timeout=0) is Outcome.REQUEUED
    assert delivery.settled == ["requeue"]


def test_a_message_is_parked_only_after_its_failure_report_is_confirmed() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler(PermanentError("gone")))
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    assert [broker.kinds(i) for i in range(len(broker.batches))] == [["sync.failed"]]

    broker.confirm(0)
    assert broker.kinds(1) == ["t.sync.dead"]  # the parked copy, only now
    assert not outcome.done() and delivery.settled == []
    broker.confirm(1)
    assert outcome.result(timeout=0) is Outcome.PARKED
    assert delivery.settled == ["ack"]


def test_an_unconfirmed_failure_report_requeues_without_parking() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(
        broker, TOPOLOGY, ScriptedHandler(PermanentError("gone")), requeue_delay_s=0
    )
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)
    broker.confirm(0, TransientError("connection to RabbitMQ lost", call="publish"))

    assert outcome.result(timeout=0) is Outcome.REQUEUED
    assert len(broker.batches) == 1 and delivery.settled == ["requeue"]


def test_a_thread_takes_the_next_delivery_while_the_last_one_awaits_its_confirm() -> None:
    broker = HeldConfirms()
    handler = ScriptedHandler()
    runner = MessageRunner(broker, TOPOLOGY, handler)
    consumer = QueueConsumer(broker, TOPOLOGY.queues()[0], runner, concurrency=1, headroom=1)
    consumer.start()
    assert broker.prefetch == 2 and broker.on_delivery is not None
    first, second = RecordedDelivery(command("c1")), RecordedDelivery(command("c2"))

    broker.on_delivery(first)
    broker.on_delivery(second)
    # One thread handled both: the first's confirm is still held back.
    _wait_for(lambda: len(broker.batches) == 2)
    assert handler.calls == 2 and first.settled == [] and second.settled == []
    assert not consumer.wait_idle(0)

    stopped = threading.Thread(target=consumer.stop)
    stopped.start()
    stopped.join(0.2)
    assert stopped.is_alive(), "stop() must wait for the confirms of what was handled"
    broker.confirm(1)
    broker.confirm(0)
    stopped.join(5)
    assert not stopped.is_alive()
    assert first.settled == ["ack"] and second.settled == ["ack"]
    assert runner.counts == {Outcome.ACKED: 2}


def test_stop_gives_up_waiting_for_confirms_after_its_timeout() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, ScriptedHandler())
    consumer = QueueConsumer(broker, TOPOLOGY.queues()[0], runner, concurrency=1)
    consumer.start()
    assert broker.on_delivery is not None
    delivery = RecordedDelivery(command())
    broker.on_delivery(delivery)
    _wait_for(lambda: len(broker.batches) == 1)

    started = time.monotonic()
    consumer.stop(timeout_s=0.2)

    assert time.monotonic() - started >= 0.2  # it did wait for the confirms
    # Not acked: RabbitMQ keeps it and redelivers it once the connection closes.
    assert delivery.settled == []


class Silent(ScriptedHandler):
    """Succeeds with nothing to publish (a no-op sync, an event only logged)."""

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        self.calls += 1
        return []


def test_a_message_with_nothing_to_publish_is_acked_at_once() -> None:
    broker = HeldConfirms()
    runner = MessageRunner(broker, TOPOLOGY, Silent())
    delivery = RecordedDelivery(command())

    outcome = runner.process(delivery)

    assert outcome.result(timeout=0) is Outcome.ACKED
    assert broker.batches == [] and delivery.settled == ["ack"]


def test_a_delivery_that_arrives_while_stopping_goes_back_to_its_queue() -> None:
    broker = HeldConfirms()
    handler = ScriptedHandler()
    consumer = QueueConsumer(
        broker, TOPOLOGY.queues()[0], MessageRunner(broker, TOPOLOGY, handler), 2
    )
    consumer.start()
    assert broker.on_delivery is not None
    consumer.stop(timeout_s=1)
    late = RecordedDelivery(command())

    broker.on_delivery(late)  # e.g. already on its way when the cancel was sent

    assert late.settled == ["requeue"] and handler.calls == 0
    assert consumer.wait_idle(0)


class Broken(MessageRunner):
    """A runner with a bug: its first message raises out of process()."""

    def process(self, delivery: Delivery) -> Future[Outcome]:
        if not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("a bug")
        return super().process(delivery)


def test_a_bug_in_the_runner_requeues_the_message_and_the_thread_goes_on() -> None:
    broker = HeldConfirms()
    consumer = QueueConsumer(broker, TOPOLOGY.queues()[0], Broken(broker, TOPOLOGY, Silent()), 1)
    consumer.start()
    assert broker.on_delivery is not None
    first, second = RecordedDelivery(command("c1")), RecordedDelivery(command("c2"))

    broker.on_delivery(first)
    broker.on_delivery(second)

    assert consumer.wait_idle(5)
    assert first.settled == ["requeue"] and second.settled == ["ack"]
    consumer.stop(timeout_s=1)


def test_the_default_headroom_is_as_many_deliveries_again_as_threads() -> None:
    assert [default_headroom(c) for c in (1, 4, 6, 32)] == [1, 4, 6, 32]


def _wait_for(condition: Callable[[], bool]) -> None:
    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.01), reraise=True):
        with attempt:
            assert condition()
