"""The embedded broker keeps the semantics the roles rely on: routing, prefetch, TTL, DLX."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.broker import Delivery, Outgoing
from adapters.memory import MemoryBroker, topic_matches
from adapters.topology import QueueSpec, Topology


def wait_until(condition, seconds: float = 5.0) -> None:
    for attempt in Retrying(stop=stop_after_delay(seconds), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert condition()


def out(key: str, body: bytes = b"{}", exchange: str | None = None, **headers: object) -> Outgoing:
    return Outgoing(key, body, "m", "c", key, headers, exchange)


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker(Topology(prefix="t", retry_delay_ms=100, delivery_limit=2))
    b.start()
    yield b
    b.close()


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("sync.command", "sync.command", True),
        ("sync.command", "sync.commands", False),
        ("sync.*", "sync.held", True),
        ("sync.*", "sync.a.b", False),
        ("sync.#", "sync", True),
        ("#", "a.b.c", True),
        ("*.completed", "sync.completed", True),
    ],
)
def test_topic_patterns_match_like_rabbitmq(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_commands_route_to_the_sync_queue_and_events_to_nobody(broker: MemoryBroker) -> None:
    broker.publish([out("sync.command"), out("sync.requested"), out("sync.completed")])
    assert broker.depth("t.sync") == 2
    assert broker.depth("t.provisioning") == 0


def test_prefetch_bounds_unacknowledged_deliveries(broker: MemoryBroker) -> None:
    held: list[Delivery] = []
    lock = threading.Lock()

    def keep(d: Delivery) -> None:
        with lock:
            held.append(d)

    broker.publish([out("sync.command") for _ in range(5)])
    broker.consume(QueueSpec("t.sync", ("sync.command",)), keep, prefetch=2)
    wait_until(lambda: len(held) == 2)
    assert broker.depth("t.sync") == 3
    held[0].ack()
    wait_until(lambda: len(held) == 3)


def test_requeued_delivery_comes_back_marked_redelivered(broker: MemoryBroker) -> None:
    seen: list[Delivery] = []

    def first_requeue_then_ack(d: Delivery) -> None:
        seen.append(d)
        d.requeue() if len(seen) == 1 else d.ack()

    broker.publish([out("sync.command")])
    broker.consume(QueueSpec("t.sync"), first_requeue_then_ack, prefetch=1)
    wait_until(lambda: len(seen) == 2)
    assert [d.redelivered for d in seen] == [False, True]


def test_retry_queue_returns_messages_to_the_work_queue_after_its_ttl(broker: MemoryBroker) -> None:
    broker.publish([out("t.sync.retry", b"again", exchange="", **{"x-sfsync-attempt": 1})])
    assert broker.depth("t.sync.retry") == 1
    wait_until(lambda: broker.depth("t.sync") == 1)
    assert broker.messages("t.sync") == [(b"again", {"x-sfsync-attempt": 1})]


def test_a_message_redelivered_past_the_limit_is_dead_lettered(broker: MemoryBroker) -> None:
    broker.publish([out("sync.command", b"poison")])
    broker.consume(
        QueueSpec("t.sync", dead_letter_to="t.sync.dead", delivery_limit=2),
        lambda d: d.requeue(),
        1,
    )
    wait_until(lambda: broker.depth("t.sync.dead") == 1)
    assert broker.messages("t.sync.dead")[0][0] == b"poison"


def test_acking_twice_is_an_error(broker: MemoryBroker) -> None:
    got: list[Delivery] = []
    broker.publish([out("sync.command")])
    broker.consume(QueueSpec("t.sync"), got.append, prefetch=1)
    wait_until(lambda: len(got) == 1)
    got[0].ack()
    with pytest.raises(RuntimeError, match="already"):
        got[0].ack()
