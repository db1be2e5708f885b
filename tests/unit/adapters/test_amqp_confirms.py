"""Publisher confirms: one settlement per publish() call, whatever order and grouping."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from pika.spec import Basic

from adapters.amqp import CONFIRM_SWEEP_S, AmqpBroker, _Batch
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


def test_publishes_without_a_confirm_by_their_deadline_fail_and_the_rest_wait() -> None:
    overdue, fresh = _Batch(2, timeout_s=60), _Batch(1, timeout_s=60)
    overdue.deadline = time.monotonic() - 1
    broker = broker_with((overdue, 2), (fresh, 1))
    channel = SimpleNamespace(is_open=True)
    sweeps: list[float] = []
    broker._channel = channel  # type: ignore[assignment]
    broker._connection = SimpleNamespace(  # type: ignore[assignment]
        ioloop=SimpleNamespace(call_later=lambda delay, _callback: sweeps.append(delay))
    )

    broker._expire_unconfirmed(channel)  # type: ignore[arg-type]

    with pytest.raises(TransientError, match="no confirm within 60s"):
        overdue.done.result(timeout=0)
    assert not fresh.done.done() and list(broker._pending) == [3]
    assert sweeps == [CONFIRM_SWEEP_S]  # and it looks again later
    confirm(broker, Basic.Ack(delivery_tag=3, multiple=True))  # a late confirm is harmless
    assert fresh.done.result(timeout=0) is None


def test_the_sweep_ends_with_its_channel() -> None:
    broker = broker_with()
    sweeps: list[float] = []
    broker._connection = SimpleNamespace(  # type: ignore[assignment]
        ioloop=SimpleNamespace(call_later=lambda delay, _callback: sweeps.append(delay))
    )
    broker._channel = SimpleNamespace(is_open=True)  # type: ignore[assignment]

    broker._expire_unconfirmed(SimpleNamespace(is_open=True))  # type: ignore[arg-type]

    assert sweeps == []
