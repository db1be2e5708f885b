"""The RabbitMQ broker: one pika connection on its own I/O thread, driven by thread-safe calls.

Why SelectConnection rather than BlockingConnection: publisher confirms arrive asynchronously, so
a scheduler can publish 10,000 commands and wait once for all their confirms instead of one
round trip each; and the I/O loop never waits on application work, so heartbeats always flow
while worker threads run long HTTP calls. Every other thread reaches the connection only through
`ioloop.add_callback_threadsafe` (pika's documented thread-safety rule).
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from adapters import pika_timestamps
from adapters.broker import Delivery, Outgoing
from adapters.topology import QueueSpec, Topology
from domain.errors import ConfigError, PermanentError, TransientError

log = logging.getLogger("sfsync.broker.amqp")
pika_timestamps.install()

RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 15.0
PUBLISH_TIMEOUT_S = 60.0
# RabbitMQ 3.x's default max_message_size (4.0 lowered it to 16 MiB). A larger message would close
# the channel; it is refused before it is sent instead (SFSYNC_MAX_MESSAGE_BYTES).
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# How often the I/O thread looks for publishes whose confirms are overdue.
CONFIRM_SWEEP_S = 1.0
# One node that does not answer (a host that is down drops packets; nothing refuses them) must not
# hold up the others for long: a TCP connect, and the whole AMQP (and TLS) handshake, time out.
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
# The client property (next to `connection_name`, the role) that names a connection's deployment.
PREFIX_PROPERTY = "sfsync_prefix"


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    params = pika.URLParameters(url)
    scheme = url.split("://", 1)[0]
    return (
        f"{scheme}://{params.credentials.username}:***@{params.host}:{params.port}{_vhost(params)}"
    )


def _vhost(params: pika.URLParameters) -> str:
    return "/" if params.virtual_host == "/" else f"/{params.virtual_host}"


@dataclass(frozen=True)
class TlsFiles:
    """What amqps:// connections trust (`ca_file`, else the system's CAs) and, when the broker
    asks for a client certificate, what they present (`cert_file`, with `key_file` unless the
    key is in the same file)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = field(default=None, repr=False)

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker's certificate and host name."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS CA file {self.ca_file} could not be loaded: {exc}") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(
                    self.cert_file, self.key_file, password=self.key_password or None
                )
            except (OSError, ssl.SSLError) as exc:
                # The reason names the problem (e.g. a key that does not match); never the password.
                raise ConfigError(
                    f"TLS client certificate {self.cert_file} (key {self.key_file or 'in it'}) "
                    f"could not be loaded: {_ssl_reason(exc)}"
                ) from None
        return context


@dataclass
class _Consumer:
    spec: QueueSpec
    on_delivery: Callable[[Delivery], None]
    prefetch: int
    tag: str | None = None
    channel: Channel | None = None  # the channel it is subscribed on, if any
    active: bool = True


class AmqpDelivery:
    """A delivery from RabbitMQ; ack/requeue are thread-safe and ignored after a reconnect
    (the broker has already put the message back for redelivery)."""

    def __init__(
        self,
        broker: AmqpBroker,
        channel: Channel,
        queue: str,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        self._broker = broker
        self._channel = channel
        self._tag = method.delivery_tag
        self.body = body
        self.queue = queue
        self.routing_key = method.routing_key
        self.headers: Mapping[str, Any] = dict(properties.headers or {})
        self.redelivered = bool(method.redelivered)
        self.message_id = properties.message_id
        self.correlation_id = properties.correlation_id
        self.type = properties.type

    def ack(self) -> None:
        self._broker._settle_later(self._settle_ack)

    def requeue(self) -> None:
        self._broker._settle_later(self._settle_requeue)

    def _settle_ack(self) -> None:
        if self._still_open():
            self._channel.basic_ack(self._tag)

    def _settle_requeue(self) -> None:
        if self._still_open():
            self._channel.basic_nack(self._tag, requeue=True)

    def _still_open(self) -> bool:
        """Our channel is the broker's current one: after a reconnect the tag means nothing."""
        return bool(self._channel.is_open and self._channel is self._broker._channel)


class AmqpBroker:
    """A RabbitMQ connection that declares the topology, publishes with confirms and consumes.

    Several URLs are the nodes of one cluster. It connects to one of them at random and, whenever
    the connection drops, reconnects by itself: to the other nodes first (in random order), then
    the lost one; after a round in which no node answered it waits (exponential backoff with
    jitter) and tries a new round. Each time it re-declares the topology and re-subscribes its
    consumers.
    """

    def __init__(
        self,
        urls: Sequence[str],
        topology: Topology,
        *,
        name: str = "sfsync",
        heartbeat_s: int = 30,
        tls: TlsFiles | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not urls:
            raise ConfigError("no AMQP URL given")
        self._parameters: list[tuple[str, pika.URLParameters]] = []
        context: ssl.SSLContext | None = None
        for url in urls:
            try:
                params = pika.URLParameters(url)
            except (ValueError, TypeError):
                # Neither the URL nor pika's message: an unencoded "/" in a password puts part of
                # it where pika reads the port, and its message quotes that part.
                raise ConfigError("invalid AMQP URL (not shown: it may hold a password)") from None
            if params.ssl_options is not None:
                # pika's default context for amqps:// verifies nothing it can name: it has no
                # server_hostname, so host name checking fails. Ours verifies both.
                context = context or (tls or TlsFiles()).context()
                params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
            params.heartbeat = heartbeat_s
            params.socket_timeout = CONNECT_TIMEOUT_S
            params.stack_timeout = HANDSHAKE_TIMEOUT_S
            # The prefix tells deployments (and test sessions) apart on a shared broker: an
            # operator, or a chaos test, can find and close exactly one deployment's connections.
            params.client_properties = {"connection_name": name, PREFIX_PROPERTY: topology.prefix}
            params.blocked_connection_timeout = 60
            self._parameters.append((redact_url(url), params))
        self.topology = topology
        self.max_message_bytes = max_message_bytes
        self._name = name
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._consumers: dict[str, _Consumer] = {}
        # Delivery tag -> the publish() call waiting for it, oldest first (I/O thread only).
        self._pending: OrderedDict[int, _Batch] = OrderedDict()
        # Every publish not yet settled, so that a lost connection fails them all, and the sweep
        # expires them, even those whose publish callback never reached the I/O thread.
        # Keyed by the batch's future, which `_forget` is handed when it completes.
        self._unsettled: dict[Future[None], _Batch] = {}
        # Acks and requeues wait here for one hand-off that settles them all: one wake-up of the
        # I/O loop per batch instead of one per message.
        self._settles: deque[Callable[[], None]] = deque()
        self._settle_scheduled = False
        # Fallbacks of hand-offs to the I/O thread that have not run yet (see _on_io_thread).
        self._fallbacks: dict[object, Callable[[], None]] = {}
        self._next_tag = 0
        self._ready = threading.Event()
        # Whether the current connection became ready (its loss restarts the backoff), and
        # whether any ever did (before that, a TLS failure is a configuration error).
        self._was_ready = False
        self._ready_once = False
        self._url: str | None = None
        self._closing = threading.Event()
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- Broker protocol ---------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name=f"amqp-{self._name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._fatal is not None or time.monotonic() > deadline:
                break
        if not self._ready.is_set() or self._fatal is not None:
            fatal = self._fatal
            self.close()
            if fatal is not None:
                raise fatal
            targets = ", ".join(url for url, _ in self._parameters)
            raise TransientError(f"no RabbitMQ answered within {timeout_s:.0f}s at {targets}")

    def publish(self, messages: Sequence[Outgoing], timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        try:
            self.publish_async(messages, timeout_s).result(timeout=timeout_s)
        except FutureTimeout:
            raise TransientError(f"no confirm within {timeout_s:.0f}s", call="publish") from None

    def publish_async(
        self, messages: Sequence[Outgoing], timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> Future[None]:
        """Waits only while no connection is ready (at most `timeout_s`, and never on the I/O
        thread, where a publish follows a confirm); the confirms are awaited on the I/O thread,
        which fails the future after `timeout_s` without them."""
        too_big = next((m for m in messages if len(m.body) > self.max_message_bytes), None)
        if too_big is not None:
            # None of the batch goes out: a worker's outputs are published all or not at all.
            refused: Future[None] = Future()
            error = PermanentError(
                f"a {too_big.type or 'message'} of {len(too_big.body):,} bytes is over the "
                f"broker's message size limit of {self.max_message_bytes:,} bytes "
                "(SFSYNC_MAX_MESSAGE_BYTES, RabbitMQ's max_message_size)",
                call="publish",
            )
            _settle(refused, error)
            return refused
        on_io_thread = threading.current_thread() is self._thread
        if not messages or not self._ready.wait(0 if on_io_thread else timeout_s):
            done: Future[None] = Future()
            _settle(
                done, TransientError("broker not connected", call="publish") if messages else None
            )
            return done
        batch = _Batch(len(messages), timeout_s)
        with self._lock:
            self._unsettled[batch.done] = batch
        # A bound method, not a partial over the batch: the batch holds its future, so that would
        # be a reference cycle (with the caller's callbacks on the future), left to the garbage
        # collector instead of freed when the confirm has been handled.
        batch.done.add_done_callback(self._forget)
        lost = TransientError("broker not connected", call="publish")
        self._on_io_thread(
            lambda: self._publish_now(messages, batch),
            fallback=lambda: _settle(batch.done, lost),
        )
        return batch.done

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        consumer = _Consumer(spec=queue, on_delivery=on_delivery, prefetch=max(1, prefetch))
        with self._lock:
            self._consumers[queue.name] = consumer
        done: Future[None] = Future()
        self._on_io_thread(
            lambda: self._subscribe(consumer, done), fallback=lambda: done.set_result(None)
        )
        # Not connected right now is fine: every (re)connect subscribes the registered consumers.
        deadline = time.monotonic() + 30
        while not done.done():
            if self._fatal is not None:
                raise self._fatal
            if time.monotonic() > deadline:
                raise TransientError(f"could not subscribe to {queue.name}", call="consume")
            try:
                done.result(timeout=0.1)
            except FutureTimeout:
                continue

    def cancel(self, queue: str) -> None:
        with self._lock:
            consumer = self._consumers.pop(queue, None)
        if consumer is None:
            return
        consumer.active = False
        done: Future[None] = Future()

        def cancel_now() -> None:
            channel = self._channel
            if consumer.tag and channel is not None and channel.is_open:
                channel.basic_cancel(consumer.tag, callback=lambda _frame: done.set_result(None))
            else:
                done.set_result(None)

        self._on_io_thread(cancel_now, fallback=lambda: done.set_result(None))
        try:
            done.result(timeout=10)
        except FutureTimeout:
            log.warning("cancel of consumer on %s not confirmed", queue)

    def close(self) -> None:
        self._closing.set()
        connection = self._connection
        if connection is not None:
            self._on_io_thread(self._close_now)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)

    def failure(self) -> BaseException | None:
        return self._fatal

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def connected_url(self) -> str | None:
        """The (redacted) URL of the node it is connected to, if it is."""
        return self._url if self._ready.is_set() else None

    # -- thread hand-off ---------------------------------------------------------------------

    def _on_io_thread(
        self, callback: Callable[[], None], fallback: Callable[[], None] | None = None
    ) -> None:
        """Run `callback` on the I/O thread; if it never will, run `fallback` (if any) instead.

        "Never will" includes a callback accepted by a loop that was already stopping when the
        connection dropped: it is stranded there, and its fallback runs once the loop has ended
        (otherwise a cancel or a subscription would wait for a confirmation that cannot come).
        """
        run = callback
        token = object()
        if fallback is not None:

            def run() -> None:
                with self._lock:
                    self._fallbacks.pop(token, None)
                callback()

        # Under the lock: `_run` drops the connection under it once the loop has ended, before it
        # runs the fallbacks; a closed loop would accept the callback and never run it.
        with self._lock:
            connection = self._connection
            if connection is not None:
                if fallback is not None:
                    self._fallbacks[token] = fallback
                try:
                    connection.ioloop.add_callback_threadsafe(run)
                    return
                except (
                    pika.exceptions.AMQPError,
                    RuntimeError,
                    AttributeError,
                    OSError,
                    ValueError,
                ):
                    self._fallbacks.pop(token, None)
        # No loop to run it (between connections, or closed): nothing to do there, and the
        # broker requeues unacked deliveries.
        if fallback is not None:
            fallback()

    def _forget(self, done: Future[None]) -> None:
        with self._lock:
            self._unsettled.pop(done, None)

    def _run_fallbacks(self, tokens: Sequence[object] | None = None) -> None:
        """Run (once) the fallbacks of the given hand-offs, or of every one still pending."""
        with self._lock:
            keys = list(self._fallbacks) if tokens is None else tokens
            fallbacks = [f for f in (self._fallbacks.pop(k, None) for k in keys) if f]
        for fallback in fallbacks:
            fallback()

    def _settle_later(self, settle: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            settle()  # already on the I/O thread (an ack from a confirm callback)
            return
        with self._lock:
            self._settles.append(settle)
            if self._settle_scheduled:
                return
            self._settle_scheduled = True
        self._on_io_thread(self._settle_all, fallback=self._drop_settles)

    def _settle_all(self) -> None:
        with self._lock:
            settles, self._settles = self._settles, deque()
            self._settle_scheduled = False
        for settle in settles:
            settle()

    def _drop_settles(self) -> None:
        # The connection is gone: RabbitMQ has requeued these deliveries itself.
        with self._lock:
            self._settles.clear()
            self._settle_scheduled = False

    # -- the I/O thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_INITIAL_S
        order = self._endpoint_order()
        while not self._closing.is_set():
            url, params = order.pop(0)
            self._url = url
            self._was_ready = False
            log.info("connecting to %s", url)
            self._connection = SelectConnection(
                params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_error,
                on_close_callback=self._on_connection_closed,
            )
            self._connection.ioloop.start()
            # The loop stopped: the connection is gone (or we are closing). From now on hand-offs
            # run their fallbacks at once (see _on_io_thread); then the loop's resources go.
            with self._lock:
                ended, self._connection = self._connection, None
            ended.ioloop.close()
            self._fail_pending(TransientError("connection to RabbitMQ lost", call="publish"))
            # Hand-offs the dead loop accepted but never ran: no later connection will run them
            # either (and none can be queued on a new loop yet: it does not exist).
            self._run_fallbacks()
            if self._closing.is_set() or self._fatal is not None:
                break
            if self._was_ready:
                # A working connection was lost: its node may be going away, so the others
                # come first; the backoff starts over.
                delay = RECONNECT_INITIAL_S
                order = self._endpoint_order(last=url)
                wait = delay * (0.5 + random.random())
                log.warning("RabbitMQ connection lost; reconnecting in %.1fs", wait)
            elif order:
                wait = 0.0  # that node did not answer: the next one may
            else:
                order = self._endpoint_order()
                wait = delay * (0.5 + random.random())
                delay = min(delay * 2, RECONNECT_MAX_S)
                log.warning("no RabbitMQ node answered; trying again in %.1fs", wait)
            self._closing.wait(wait)

    def _endpoint_order(self, last: str | None = None) -> list[tuple[str, pika.URLParameters]]:
        """Every endpoint once, in random order (spreading roles over the nodes); `last` last."""
        order = random.sample(self._parameters, len(self._parameters))
        order.sort(key=lambda endpoint: endpoint[0] == last)
        return order

    def _on_connection_open(self, connection: SelectConnection) -> None:
        if self._closing.is_set():
            connection.close()  # close() came during the handshake (see _close_now)
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_error(self, connection: SelectConnection, error: BaseException) -> None:
        tls_problem = _tls_problem(error)
        refused = _login_refused(error)
        if tls_problem is not None and not self._ready_once:
            # A certificate that is not trusted (or not accepted) will not become so by retrying:
            # at start-up that is a configuration error, said once and clearly.
            self._fatal = ConfigError(f"TLS with {self._url} failed: {tls_problem}")
            log.error("%s", self._fatal)
        elif refused is not None and not self._ready_once:
            # RabbitMQ answered and said no: not "nobody answered" after 30 s of retries. Later
            # (credentials rotated under a running process) it is retried like any lost node.
            self._fatal = ConfigError(f"RabbitMQ at {self._url} refused the login: check {refused}")
            log.error("%s", self._fatal)
        elif not self._closing.is_set():
            log.warning("could not connect to %s: %s", self._url, tls_problem or _describe(error))
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: SelectConnection, reason: BaseException) -> None:
        self._ready.clear()
        self._channel = None
        if not self._closing.is_set():
            log.warning("RabbitMQ connection closed: %s", _describe(reason))
        connection.ioloop.stop()

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._pending.clear()
        self._next_tag = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._declare_all())
        self._expire_unconfirmed(channel)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        # A closed channel is a protocol error. Refused (403/406) while declaring, it is the
        # topology (a queue declared with other arguments): no reconnect can fix that. Once
        # ready, the same codes mean one message or ack (a message over RabbitMQ's
        # max_message_size, an ack after consumer_timeout): reconnect, so that RabbitMQ
        # redelivers the unacked messages and its delivery limit parks one that fails every time.
        declaring = not self._ready.is_set()
        self._ready.clear()
        if not self._closing.is_set():
            by_broker = (
                reason if isinstance(reason, pika.exceptions.ChannelClosedByBroker) else None
            )
            refused = by_broker is not None and by_broker.reply_code in (403, 406)
            if by_broker is not None and refused and declaring:
                self._fatal = ConfigError(f"RabbitMQ refused the topology: {by_broker.reply_text}")
                log.error("%s", self._fatal)
            elif refused:
                log.error("RabbitMQ closed the channel, reconnecting: %s", _describe(reason))
            else:
                log.warning("RabbitMQ channel closed: %s", _describe(reason))
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _on_consumer_cancelled(self, frame: Any) -> None:
        log.warning("RabbitMQ cancelled a consumer (queue deleted?); reconnecting")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _declare_all(self) -> None:
        steps: list[Callable[[Callable[[Any], None]], None]] = []
        channel = self._channel
        assert channel is not None
        topology = self.topology
        steps.append(
            lambda cb: channel.exchange_declare(
                exchange=topology.exchange, exchange_type="topic", durable=True, callback=cb
            )
        )
        for spec in topology.queues():
            steps.extend(self._queue_steps(channel, spec))
        with self._lock:
            consumers = list(self._consumers.values())
        for consumer in consumers:
            steps.extend(self._queue_steps(channel, consumer.spec))
            steps.append(self._consume_step(channel, consumer))

        def ready() -> None:
            log.info("RabbitMQ ready at %s (exchange %s)", self._url, topology.exchange)
            self._was_ready = self._ready_once = True
            self._ready.set()

        _chain(steps, ready)

    def _queue_steps(
        self, channel: Channel, spec: QueueSpec
    ) -> list[Callable[[Callable[[Any], None]], None]]:
        arguments: dict[str, Any] = {}
        if spec.quorum:
            arguments["x-queue-type"] = "quorum"
        if spec.message_ttl_ms is not None:
            arguments["x-message-ttl"] = spec.message_ttl_ms
        if spec.dead_letter_to is not None:
            arguments["x-dead-letter-exchange"] = ""
            arguments["x-dead-letter-routing-key"] = spec.dead_letter_to
            if spec.quorum:
                # At-least-once dead-lettering: a message is not lost between the two queues.
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
        if spec.delivery_limit is not None:
            arguments["x-delivery-limit"] = spec.delivery_limit
        if spec.expires_ms is not None:
            arguments["x-expires"] = spec.expires_ms
        steps: list[Callable[[Callable[[Any], None]], None]] = [
            lambda cb: channel.queue_declare(
                queue=spec.name, durable=True, arguments=arguments, callback=cb
            )
        ]
        for key in spec.routing_keys:
            steps.append(self._bind_step(channel, spec.name, key))
        return steps

    def _bind_step(
        self, channel: Channel, queue: str, key: str
    ) -> Callable[[Callable[[Any], None]], None]:
        def step(cb: Callable[[Any], None]) -> None:
            channel.queue_bind(
                queue=queue, exchange=self.topology.exchange, routing_key=key, callback=cb
            )

        return step

    def _consume_step(
        self, channel: Channel, consumer: _Consumer
    ) -> Callable[[Callable[[Any], None]], None]:
        def on_message(
            ch: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes
        ) -> None:
            if not consumer.active:
                ch.basic_nack(method.delivery_tag, requeue=True)
                return
            consumer.on_delivery(
                AmqpDelivery(self, ch, consumer.spec.name, method, properties, body)
            )

        def step(cb: Callable[[Any], None]) -> None:
            # basic_qos per consumer: prefetch applies to consumers started after it.
            def start(_frame: Any) -> None:
                # Two chains (connect-time declare and a late consume()) may both reach here.
                if consumer.channel is channel or not consumer.active:
                    cb(None)
                    return
                consumer.channel = channel
                consumer.tag = channel.basic_consume(consumer.spec.name, on_message, callback=cb)

            channel.basic_qos(prefetch_count=consumer.prefetch, callback=start)

        return step

    def _subscribe(self, consumer: _Consumer, done: Future[None]) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            # Not connected now: _declare_all subscribes it on the next (re)connect.
            done.set_result(None)
            return
        steps = self._queue_steps(channel, consumer.spec)
        steps.append(self._consume_step(channel, consumer))
        _chain(steps, lambda: done.set_result(None))

    def _publish_now(self, messages: Sequence[Outgoing], batch: _Batch) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            _settle(batch.done, TransientError("broker not connected", call="publish"))
            return
        for out in messages:
            properties = BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=out.message_id,
                correlation_id=out.correlation_id,
                type=out.type,
                headers=dict(out.headers) or None,
            )
            exchange = self.topology.exchange if out.exchange is None else out.exchange
            try:
                channel.basic_publish(exchange, out.routing_key, out.body, properties)
            except pika.exceptions.AMQPError as exc:
                batch.settle_one(TransientError(f"publish failed: {exc!r}", call="publish"))
                continue
            except Exception as exc:  # noqa: BLE001 - see below
                # pika encodes a frame before it writes it: a property it cannot encode (a
                # UnicodeError, a struct.error for an int over 64 bits, ...) fails this one
                # message, and must not end the I/O thread that all the others need.
                batch.settle_one(
                    PermanentError(
                        f"message could not be encoded: {type(exc).__name__}", call="publish"
                    )
                )
                continue
            self._next_tag += 1
            self._pending[self._next_tag] = batch

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        error = (
            TransientError("RabbitMQ rejected a publish", call="publish")
            if isinstance(method, Basic.Nack)
            else None
        )
        pending = self._pending
        if not method.multiple:
            batch = pending.pop(tag, None)
            if batch is not None:
                batch.settle_one(error)
            return
        # Every tag up to this one: the oldest first, without scanning the newer ones.
        while pending:
            oldest = next(iter(pending))
            if oldest > tag:
                break
            pending.popitem(last=False)[1].settle_one(error)

    def _expire_unconfirmed(self, channel: Channel) -> None:
        """Fail the publishes whose confirms are overdue; again every CONFIRM_SWEEP_S while
        `channel` is the current one. A confirm that comes later finds its publish settled."""
        connection = self._connection
        if not channel.is_open or channel is not self._channel or connection is None:
            return
        now = time.monotonic()
        with self._lock:
            overdue = [batch for batch in self._unsettled.values() if batch.deadline <= now]
        for batch in overdue:
            batch.expire()
        connection.ioloop.call_later(CONFIRM_SWEEP_S, lambda: self._expire_unconfirmed(channel))

    def _fail_pending(self, error: TransientError) -> None:
        self._pending = OrderedDict()
        with self._lock:
            unsettled = list(self._unsettled)
        _fail_all(unsettled, error)

    def _close_now(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closing:
            return  # its close callback stops the loop
        if connection.is_closed:
            connection.ioloop.stop()
        elif connection.is_open or connection.connection_state == connection.CONNECTION_INIT:
            connection.close()  # open, or still connecting: pika closes the socket
        # Otherwise the AMQP handshake is under way, and pika 1.4.4 cannot abort it: close() (or
        # its workflow's abort()) then ends this thread on an assertion and leaves the socket open.
        # It ends by itself within HANDSHAKE_TIMEOUT_S, and a connection that opens is closed then.


class _Batch:
    """The confirms one publish call waits for: one Future, settled by the last of them, or
    failed once `deadline` has passed without them (see `_expire_unconfirmed`).

    One Future per batch, not per message: a Future builds a Condition and a lock, which cost the
    scheduler a sixth of its time when it was one per message. Touched on the I/O thread only.
    """

    __slots__ = ("deadline", "done", "error", "remaining", "timeout_s")

    def __init__(self, count: int, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.done: Future[None] = Future()
        self.remaining = count
        self.error: BaseException | None = None
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def settle_one(self, error: BaseException | None) -> None:
        """One message confirmed (error None) or failed; the first failure fails the batch."""
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            _settle(self.done, self.error)

    def expire(self) -> None:
        error = TransientError(f"no confirm within {self.timeout_s:.0f}s", call="publish")
        _settle(self.done, self.error or error)


def _fail_all(futures: Sequence[Future[None]], error: BaseException) -> None:
    for future in futures:
        _settle(future, error)


def _settle(future: Future[None], error: BaseException | None = None) -> None:
    """Complete a future once; a confirm racing a connection loss must not raise."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


def _chain(steps: list[Callable[[Callable[[Any], None]], None]], done: Callable[[], None]) -> None:
    """Run callback-style AMQP operations one after another, then `done`."""
    remaining = iter(steps)

    def next_step(_frame: Any = None) -> None:
        step = next(remaining, None)
        if step is None:
            done()
        else:
            step(next_step)

    next_step()


def _login_refused(error: BaseException) -> str | None:
    """What to check when RabbitMQ itself refused the login (403) or the vhost (530), else None.

    pika reports any connection lost during those steps (a node shutting down, a reset) with the
    same exception types: only the broker's own answer, quoted in the message, is decisive.
    """
    text = str(error)
    if isinstance(error, pika.exceptions.ProbableAuthenticationError) and "ACCESS_REFUSED" in text:
        return "the user name or password"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError) and "NOT_ALLOWED" in text:
        return "the vhost (or the user's access to it)"
    return None


def _tls_problem(error: BaseException) -> str | None:
    """What went wrong in a TLS handshake, if `error` (or what it wraps) is a TLS failure."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:  # the exception objects first: they say more than their text
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"the broker's certificate was not accepted: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"the TLS handshake failed: {_ssl_reason(current)}"
        # pika nests the cause: AMQPConnectionWorkflowFailed(exceptions=[AMQPConnector...Error(
        # exception=SSLError)]), and an alert received after the handshake survives only as text.
        nested = [*current.args, *(getattr(current, "exceptions", None) or ())]
        nested += [item for arg in current.args if isinstance(arg, list | tuple) for item in arg]
        nested += [getattr(current, "exception", None), current.__cause__, current.__context__]
        pending.extend(e for e in nested if isinstance(e, BaseException))
    alert = _SSL_TEXT.search(str(error))
    return f"the TLS handshake failed: {alert.group(1).strip()}" if alert else None


# "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)"
_SSL_TEXT = re.compile(r"\[SSL: [A-Z0-9_]+\] ([^(\\'\"]+)")


def _ssl_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else _describe(error)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
