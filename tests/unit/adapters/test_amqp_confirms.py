"""Publisher confirms: one settlement per publish() call, whatever order and grouping."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from pika.spec import Basic

from adapters.amqp import AmqpBroker, _Batch
from adapters.topology import Topology
from domain.errors import PermanentError, TransientError


def broker_with(*batches: tuple[_Batch, int]) -> AmqpBroker:
    """A broker (never started) whose channel has published `count` messages of each batch."""
    broker = AmqpBroker(["amqp://guest:guest@127.0.0.1:1/"], Topology(prefix="t"))
    for batch, count in batches:
        for _ in range(count):
            broker._next_tag += 1
            broker._pending[broker._next_tag] = batch
    return broker


def confirm(broker: AmqpBroker, method: object) -> None:
    broker._on_confirm(SimpleNamespace(method=method))


def test_a_batch_is_settled_by_its_last_confirm_not_before() -> None:
    first, second = _Batch(3), _Batch(2)
    broker = broker_with((first, 3), (second, 2))

    confirm(broker, Basic.Ack(delivery_tag=2, multiple=True))
    assert not first.done.done()
    confirm(broker, Basic.Ack(delivery_tag=5, multiple=False))  # out of order: second's last
    assert not first.done.done() and not second.done.done()
    confirm(broker, Basic.Ack(delivery_tag=4, multiple=True))  # 3 and 4

    assert first.done.result(timeout=0) is None
    assert second.done.result(timeout=0) is None
    assert not broker._pending


def test_a_multiple_confirm_leaves_later_tags_pending() -> None:
    batch = _Batch(1000)
    broker = broker_with((batch, 1000))

    confirm(broker, Basic.Ack(delivery_tag=400, multiple=True))

    assert list(broker._pending)[:1] == [401] and len(broker._pending) == 600
    assert batch.remaining == 600 and not batch.done.done()


def test_one_nack_fails_the_whole_publish_call() -> None:
    batch, other = _Batch(3), _Batch(1)
    broker = broker_with((batch, 3), (other, 1))

    confirm(broker, Basic.Nack(delivery_tag=2, multiple=False))
    confirm(broker, Basic.Ack(delivery_tag=4, multiple=True))

    with pytest.raises(TransientError, match="rejected"):
        batch.done.result(timeout=0)
    assert other.done.result(timeout=0) is None


def test_the_first_failure_of_a_batch_is_the_one_reported() -> None:
    batch = _Batch(3)

    batch.settle_one(PermanentError("message could not be encoded: ValueError"))
    batch.settle_one(None)
    assert not batch.done.done()
    batch.settle_one(TransientError("RabbitMQ rejected a publish"))

    with pytest.raises(PermanentError, match="could not be encoded"):
        batch.done.result(timeout=0)


def sweeping(broker: AmqpBroker) -> tuple[SimpleNamespace, list[Callable[[], None]]]:
    """Give a never-started broker an open channel, and a loop that keeps its timers here."""
    channel = SimpleNamespace(is_open=True)
    timers: list[Callable[[], None]] = []
    broker._channel = channel  # type: ignore[assignment]
    broker._connection = SimpleNamespace(  # type: ignore[assignment]
        ioloop=SimpleNamespace(call_later=lambda delay, callback: timers.append(callback))
    )
    return channel, timers


def test_publishes_without_a_confirm_by_their_deadline_fail_and_the_rest_wait() -> None:
    # A long timeout published first must not shield a shorter one behind it.
    patient, overdue = _Batch(1, timeout_s=600), _Batch(2, timeout_s=5)
    overdue.deadline = time.monotonic() - 1
    broker = broker_with((patient, 1), (overdue, 2))
    broker._unsettled.update({patient.done: patient, overdue.done: overdue})
    channel, _timers = sweeping(broker)

    broker._expire_unconfirmed(channel)  # type: ignore[arg-type]

    with pytest.raises(TransientError, match="no confirm within 5s"):
        overdue.done.result(timeout=0)
    assert not patient.done.done()
    confirm(broker, Basic.Ack(delivery_tag=3, multiple=True))  # late confirms are harmless
    assert patient.done.result(timeout=0) is None


def test_the_sweep_comes_back_while_its_channel_lives_and_ends_with_it() -> None:
    broker = broker_with()
    channel, timers = sweeping(broker)
    broker._expire_unconfirmed(channel)  # type: ignore[arg-type]
    [again] = timers
    late = _Batch(1, timeout_s=5)
    late.deadline = time.monotonic() - 1
    broker._unsettled[late.done] = late  # never handed to the channel (its hand-off was lost)

    again()

    assert late.done.exception(timeout=0) is not None
    assert len(timers) == 2
    broker._channel = SimpleNamespace(is_open=True)  # type: ignore[assignment]  # a reconnect
    timers[-1]()
    assert len(timers) == 2  # the old channel's sweep has ended


def test_after_the_loop_has_gone_a_hand_off_runs_its_fallback_at_once() -> None:
    broker = broker_with()  # never started: no loop, as between two connections
    ran: list[str] = []

    broker._on_io_thread(lambda: ran.append("callback"), fallback=lambda: ran.append("fallback"))

    assert ran == ["fallback"] and not broker._fallbacks
