"""The embedded `memory://` broker: the same routing, acks, retry delays and parking, in-process."""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from adapters.broker import Delivery, Outgoing, published_now
from adapters.topology import DELIVERY_COUNT_HEADER, QueueSpec, Topology

log = logging.getLogger("sfsync.broker.memory")


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    regex = (
        "^"
        + r"\.".join(
            {"*": r"[^.]+", "#": r".*"}.get(word, re.escape(word)) for word in pattern.split(".")
        )
        + "$"
    )
    # "a.#" must also match "a": let "\.#" swallow its dot.
    regex = regex.replace(r"\..*", r"(\..*)?")
    return re.match(regex, routing_key) is not None


@dataclass
class _Message:
    body: bytes
    routing_key: str
    headers: dict[str, Any]
    message_id: str | None
    correlation_id: str | None
    type: str | None
    delivery_count: int = 0


@dataclass
class _Queue:
    spec: QueueSpec
    ready: deque[_Message] = field(default_factory=deque)
    unacked: int = 0
    consumer: Callable[[Delivery], None] | None = None
    prefetch: int = 1


class MemoryDelivery:
    """A delivery from the memory broker; ack/requeue may be called from any thread."""

    def __init__(self, broker: MemoryBroker, queue: _Queue, message: _Message) -> None:
        self._broker = broker
        self._queue = queue
        self._message = message
        self._settled = False
        self.body = message.body
        self.queue = queue.spec.name
        self.routing_key = message.routing_key
        self.headers: Mapping[str, Any] = dict(message.headers)
        if queue.spec.delivery_limit is not None:  # as RabbitMQ's quorum queues count them
            self.headers = {**self.headers, DELIVERY_COUNT_HEADER: message.delivery_count - 1}
        self.redelivered = message.delivery_count > 1
        self.message_id = message.message_id
        self.correlation_id = message.correlation_id
        self.type = message.type

    def ack(self) -> None:
        self._broker._settle(self, requeue=False)

    def requeue(self) -> None:
        self._broker._settle(self, requeue=True)


class MemoryBroker:
    """Thread-safe in-memory broker with the semantics the roles and tests rely on.

    Publishing is "confirmed" once the message sits in every queue its key routes to. A queue
    with a TTL moves messages to its dead-letter queue when they expire (the retry delay); a
    message redelivered more than `delivery_limit` times is dead-lettered too.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._lock = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._delayed: list[tuple[float, int, str, _Message]] = []
        self._sequence = itertools.count()
        self._closed = False
        self._threads: list[threading.Thread] = []

    # -- Broker protocol ---------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            for spec in self.topology.queues():
                self._declare(spec)
        self._spawn(self._expire_loop, "memory-broker-ttl")

    def publish(self, messages: Sequence[Outgoing]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("memory broker is closed")
            for out in messages:
                message = _Message(
                    body=out.body,
                    routing_key=out.routing_key,
                    headers=dict(out.headers),
                    message_id=out.message_id,
                    correlation_id=out.correlation_id,
                    type=out.type,
                )
                if out.exchange == "":
                    targets = [out.routing_key] if out.routing_key in self._queues else []
                else:
                    targets = [
                        name
                        for name, queue in self._queues.items()
                        if any(topic_matches(p, out.routing_key) for p in queue.spec.routing_keys)
                    ]
                for name in targets:
                    self._enqueue(name, _copy(message))
            self._lock.notify_all()

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        return published_now(self.publish, messages)

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        with self._lock:
            state = self._declare(queue)
            if state.consumer is not None:
                raise RuntimeError(f"queue {queue.name} already has a consumer")
            state.consumer = on_delivery
            state.prefetch = max(1, prefetch)
        self._spawn(lambda: self._dispatch_loop(state), f"memory-broker-{queue.name}")

    def cancel(self, queue: str) -> None:
        with self._lock:
            if queue in self._queues:
                self._queues[queue].consumer = None
            self._lock.notify_all()

    def failure(self) -> BaseException | None:
        return None  # nothing outside this process can refuse it

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for queue in self._queues.values():
                queue.consumer = None
            self._lock.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    # -- inspection (tests, the demo) -------------------------------------------------------

    def depth(self, queue: str) -> int:
        with self._lock:
            state = self._queues.get(queue)
            delayed = sum(1 for _, _, name, _ in self._delayed if name == queue)
            return (len(state.ready) + delayed) if state else 0

    def messages(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Bodies and headers waiting in `queue` (e.g. a parking queue), oldest first."""
        with self._lock:
            state = self._queues.get(queue)
            return [(m.body, dict(m.headers)) for m in state.ready] if state else []

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _declare(self, spec: QueueSpec) -> _Queue:
        if spec.name not in self._queues:
            self._queues[spec.name] = _Queue(spec=spec)
        return self._queues[spec.name]

    def _enqueue(self, name: str, message: _Message) -> None:
        queue = self._queues[name]
        if queue.spec.message_ttl_ms is not None:
            due = time.monotonic() + queue.spec.message_ttl_ms / 1000
            heapq.heappush(self._delayed, (due, next(self._sequence), name, message))
        else:
            queue.ready.append(message)

    def _dead_letter(self, queue: _Queue, message: _Message) -> None:
        target = queue.spec.dead_letter_to
        if target is None or target not in self._queues:
            log.warning("dropping message from %s: no dead-letter queue", queue.spec.name)
            return
        message.delivery_count = 0
        self._queues[target].ready.append(message)

    def _expire_loop(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, _, name, message = heapq.heappop(self._delayed)
                    self._dead_letter(self._queues[name], message)
                    self._lock.notify_all()
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._lock.wait(timeout=timeout)

    def _dispatch_loop(self, queue: _Queue) -> None:
        while True:
            with self._lock:
                while (
                    not self._closed
                    and queue.consumer is not None
                    and (not queue.ready or queue.unacked >= queue.prefetch)
                ):
                    self._lock.wait()
                consumer = queue.consumer
                if self._closed or consumer is None:
                    return
                message = queue.ready.popleft()
                message.delivery_count += 1
                limit = queue.spec.delivery_limit
                if limit is not None and message.delivery_count > limit + 1:
                    self._dead_letter(queue, message)
                    continue
                queue.unacked += 1
                delivery = MemoryDelivery(self, queue, message)
            consumer(delivery)

    def _settle(self, delivery: MemoryDelivery, *, requeue: bool) -> None:
        with self._lock:
            if delivery._settled:
                raise RuntimeError("delivery already acknowledged")
            delivery._settled = True
            delivery._queue.unacked -= 1
            if requeue:
                delivery._queue.ready.appendleft(delivery._message)
            self._lock.notify_all()


def _copy(message: _Message) -> _Message:
    """One queue's own copy: its headers and delivery count are not shared with other queues."""
    return replace(message, headers=dict(message.headers), delivery_count=0)
