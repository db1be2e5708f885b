"""The RabbitMQ adapter against a real broker: topology, confirms, acks, retries, reconnects."""

from __future__ import annotations

import gc
import logging
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator

import pika
import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.amqp import AmqpBroker, redact_url
from adapters.broker import Delivery, Outgoing
from adapters.topology import REASON_HEADER, Topology
from consumers.runner import MessageRunner, Outcome, QueueConsumer
from domain.errors import ConfigError, PermanentError, TransientError

pytestmark = pytest.mark.broker


def eventually(condition, seconds: float = 15.0) -> None:
    for attempt in Retrying(stop=stop_after_delay(seconds), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            assert condition()


def out(key: str, body: bytes = b"{}") -> Outgoing:
    return Outgoing(key, body, "m", "c", key)


@pytest.fixture
def broker(amqp_url: str, topology: Topology) -> Iterator[AmqpBroker]:
    b = AmqpBroker([amqp_url], topology, name=f"{topology.prefix}-test", heartbeat_s=5)
    b.start()
    yield b
    b.close()


def queue_info(amqp_url: str, name: str) -> tuple[int, dict]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        frame = connection.channel().queue_declare(name, passive=True)
        return frame.method.message_count, {}
    finally:
        connection.close()


def test_topology_is_durable_quorum_queues_and_declaring_twice_is_harmless(
    amqp_url: str, topology: Topology, broker: AmqpBroker
) -> None:
    again = AmqpBroker([amqp_url], topology, name="again")
    again.start()
    again.close()
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type", "durable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(topology.prefix)
    }
    assert set(rows) == {spec.name for spec in topology.queues()}
    assert all(row == ["quorum", "true"] for row in rows.values())


def test_published_messages_are_confirmed_routed_and_consumed(
    broker: AmqpBroker, topology: Topology
) -> None:
    got: list[Delivery] = []
    broker.publish(
        [out("sync.command", b'{"n":%d}' % i) for i in range(50)] + [out("provisioning.requested")]
    )
    broker.consume(topology.queues()[0], lambda d: (got.append(d), d.ack()), prefetch=10)
    eventually(lambda: len(got) == 50)
    assert got[0].type == "sync.command" and got[0].routing_key == "sync.command"


def test_a_confirmed_publish_is_freed_without_the_garbage_collector(broker: AmqpBroker) -> None:
    # A worker publishes up to two messages per customer: a reference cycle per publish left its
    # future, lock, condition and the runner's callbacks (about 35 objects per customer) to the
    # cyclic collector, and held them in memory until it ran.
    done = threading.Event()
    confirmed = broker.publish_async([out("sync.command")])
    confirmed.add_done_callback(lambda _f: done.set())
    assert done.wait(15) and confirmed.exception() is None
    gone = weakref.ref(confirmed)
    gc.disable()
    try:
        del confirmed
        eventually(lambda: gone() is None, seconds=5)  # the I/O thread lets go of it after confirm
    finally:
        gc.enable()


def test_a_queue_declared_with_other_arguments_is_a_clear_config_error(
    amqp_url: str, topology: Topology
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_declare(topology.sync_queue, durable=True)  # classic, no arguments
    connection.close()
    with pytest.raises(ConfigError, match="refused the topology"):
        AmqpBroker([amqp_url], topology).start(timeout_s=10)


def test_nothing_answering_is_a_transient_error_naming_the_url_without_password(
    topology: Topology,
) -> None:
    with pytest.raises(TransientError) as error:
        AmqpBroker(["amqp://guest:hunter2@127.0.0.1:1/"], topology).start(timeout_s=2)
    assert "127.0.0.1:1" in str(error.value) and "hunter2" not in str(error.value)
    assert redact_url("amqp://u:pw@h:5672/v") == "amqp://u:***@h:5672/v"


@pytest.mark.parametrize(
    ("login", "vhost", "check"),
    [
        ("guest:wrong-password", "", "check the user name or password"),
        ("guest:guest", "no-such-vhost", "check the vhost"),
    ],
)
def test_refused_credentials_are_a_config_error_at_once_without_the_password(
    amqp_url: str, topology: Topology, login: str, vhost: str, check: str
) -> None:
    broker = pika.URLParameters(amqp_url)
    url = f"amqp://{login}@{broker.host}:{broker.port}/{vhost}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        AmqpBroker([url], topology).start(timeout_s=30)
    assert time.monotonic() - started < 10  # not after the whole start-up timeout
    assert "refused the login" in str(error.value) and check in str(error.value)
    assert "wrong-password" not in str(error.value)


def test_a_node_that_drops_the_connection_during_login_is_not_a_refused_login(
    amqp_url: str, topology: Topology
) -> None:
    # pika reports a connection lost while logging in (a node shutting down) with the same
    # exception as wrong credentials: only RabbitMQ's own ACCESS_REFUSED is a configuration
    # error, otherwise the other nodes of the list are still tried.
    from pika import frame, spec

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def drop_after_login() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.recv(8)  # the protocol header
                start = spec.Connection.Start(
                    server_properties={"product": "fake"}, mechanisms=b"PLAIN", locales=b"en_US"
                )
                connection.sendall(frame.Method(0, start).marshal())
                connection.recv(4096)  # StartOk, with the credentials: then the node goes away

    threading.Thread(target=drop_after_login, daemon=True).start()
    dropping = f"amqp://guest:guest@127.0.0.1:{port}/"
    try:
        with pytest.raises(TransientError, match="no RabbitMQ answered"):
            AmqpBroker([dropping], topology).start(timeout_s=3)
        broker = AmqpBroker([dropping, amqp_url], topology)
        broker.start(timeout_s=30)  # whichever it tries first, it ends on the real one
        try:
            assert broker.connected_url == redact_url(amqp_url)
        finally:
            broker.close()
    finally:
        server.close()


class Flaky:
    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.calls = 0

    def handle(self, message):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise TransientError("503 from ShareFile", customer_id="c1")
        return []

    def on_give_up(self, message, error):
        return []


def a_command() -> bytes:
    from domain.messages import SyncCommand
    from tests.fakes import fixed_stamper

    return fixed_stamper()(SyncCommand(customer_id="c1", run_id="r"), correlation_id="r").to_json()


def test_transient_failures_come_back_through_the_retry_queue_then_park(
    amqp_url: str, broker: AmqpBroker, topology: Topology
) -> None:
    handler = Flaky(fail_times=10)
    runner = MessageRunner(broker, topology, handler, max_attempts=3)
    consumer = QueueConsumer(broker, topology.queues()[0], runner, concurrency=2)
    consumer.start()
    broker.publish([out("sync.command", a_command())])
    eventually(lambda: runner.counts[Outcome.PARKED] == 1)
    consumer.stop()
    assert handler.calls == 3 and runner.counts[Outcome.RETRIED] == 2
    body, headers = first_parked(amqp_url, topology.dead_queue(topology.sync_queue))
    assert body == a_command()
    assert "gave up after 3 attempts" in headers[REASON_HEADER]


def first_parked(amqp_url: str, queue: str) -> tuple[bytes, dict]:
    """Take the first message of a parking queue: its body and headers."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        _method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        return body, properties.headers
    finally:
        connection.close()


class Oversized:
    """Answers a command with a report over the broker's size limit (a customer's first sync
    with a million unmatched users, say); its failure report is small."""

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, message):
        self.calls += 1
        return [self.report("x" * 5000)]

    def on_give_up(self, message, error):
        return [self.report(str(error))]

    @staticmethod
    def report(error: str):
        from domain.messages import SyncFailed
        from tests.fakes import fixed_stamper

        failed = SyncFailed(customer_id="c1", run_id="r", outcome="failed", error=error)
        return fixed_stamper()(failed, correlation_id="r")


def test_outputs_over_the_size_limit_are_not_sent_and_the_command_is_parked_with_a_report(
    amqp_url: str, topology: Topology
) -> None:
    broker = AmqpBroker(
        [amqp_url], topology, name=f"{topology.prefix}-small", max_message_bytes=4096
    )
    broker.start()
    try:
        refused = broker.publish_async([out("sync.command"), out("sync.command", b"x" * 4097)])
        error = refused.exception(timeout=5)
        assert isinstance(error, PermanentError)
        assert "4,097 bytes is over the broker's message size limit of 4,096" in str(error)
        assert queue_info(amqp_url, topology.sync_queue)[0] == 0  # none of the batch went out

        handler = Oversized()
        runner = MessageRunner(broker, topology, handler)
        consumer = QueueConsumer(broker, topology.queues()[0], runner, concurrency=2)
        consumer.start()
        broker.publish([out("sync.command", a_command())])
        eventually(lambda: runner.counts[Outcome.PARKED] == 1)
        consumer.stop()
        assert handler.calls == 1 and broker.connected
        body, headers = first_parked(amqp_url, topology.dead_queue(topology.sync_queue))
        assert body == a_command()
        assert "outputs refused" in headers[REASON_HEADER]
    finally:
        broker.close()


def close_connections_named(name: str) -> int:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    pids = [line.split()[0] for line in listing.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test: broker goes away"],
            check=True,
            timeout=60,
        )
    return len(pids)


def test_a_closed_connection_is_reopened_and_consumers_resume(
    broker: AmqpBroker, topology: Topology
) -> None:
    got: list[bytes] = []
    broker.consume(topology.queues()[0], lambda d: (got.append(d.body), d.ack()), prefetch=5)
    broker.publish([out("sync.command", b"before")])
    eventually(lambda: got == [b"before"])
    assert close_connections_named(f"{topology.prefix}-test") == 1
    eventually(lambda: not broker.connected, seconds=10)
    eventually(lambda: broker.connected, seconds=30)
    broker.publish([out("sync.command", b"after")])
    eventually(lambda: got == [b"before", b"after"])


def test_a_channel_refused_while_running_reconnects_instead_of_stopping(
    broker: AmqpBroker, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    # 406 once ready is one message or ack (here: an ack of a tag the channel never delivered;
    # also a message over max_message_size), not the topology: the worker must not go idle.
    got: list[bytes] = []
    broker.consume(topology.queues()[0], lambda d: (got.append(d.body), d.ack()), prefetch=5)
    broker.publish([out("sync.command", b"before")])
    eventually(lambda: got == [b"before"])
    channel = broker._channel
    assert channel is not None
    broker._on_io_thread(lambda: channel.basic_ack(424242))
    eventually(lambda: broker._channel is not channel and broker.connected, seconds=30)
    broker.publish([out("sync.command", b"after")])
    eventually(lambda: got == [b"before", b"after"])
    assert broker._fatal is None
    assert "RabbitMQ closed the channel, reconnecting" in caplog.text
    assert "unknown delivery tag 424242" in caplog.text


def test_an_ack_handed_over_between_two_connections_does_not_stall_later_acks(
    broker: AmqpBroker, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    # pika's closed loop accepts a thread-safe callback and never runs it: an ack lost there once
    # kept every later ack from being handed over, and a consumer stalled at its prefetch.
    got: list[Delivery] = []
    broker.consume(topology.queues()[0], got.append, prefetch=1)
    broker.publish([out("sync.command", b"first"), out("sync.command", b"second")])
    eventually(lambda: len(got) == 1)
    caplog.set_level(logging.WARNING, logger="sfsync.broker.amqp")
    assert close_connections_named(f"{topology.prefix}-test") == 1
    # Logged after the old loop is closed, just before the backoff (0.25 s at least).
    eventually(lambda: "reconnecting in" in caplog.text, seconds=10)
    got[0].ack()  # meaningless now (RabbitMQ has requeued it), and must be harmless

    eventually(lambda: len(got) == 2, seconds=30)
    got[1].ack()
    eventually(lambda: len(got) == 3)
    got[2].ack()
    assert sorted(d.body for d in got[1:]) == [b"first", b"second"]


def test_a_handler_slower_than_two_heartbeats_does_not_lose_the_connection(
    amqp_url: str, topology: Topology
) -> None:
    broker = AmqpBroker([amqp_url], topology, name="slow", heartbeat_s=1)
    broker.start()
    done = threading.Event()

    class Slow:
        def handle(self, message):
            time.sleep(3.5)  # the work itself: longer than two heartbeat intervals
            done.set()
            return []

        def on_give_up(self, message, error):
            return []

    runner = MessageRunner(broker, topology, Slow())
    consumer = QueueConsumer(broker, topology.queues()[0], runner, concurrency=1)
    try:
        consumer.start()
        broker.publish([out("sync.command", a_command())])
        assert done.wait(20)
        eventually(lambda: runner.counts[Outcome.ACKED] == 1)
        assert broker.connected
    finally:
        consumer.stop()
        broker.close()


def test_outputs_refused_for_seconds_are_published_later_not_dead_lettered(
    amqp_url: str, broker: AmqpBroker, topology: Topology
) -> None:
    # While a quorum queue elects a new leader RabbitMQ nacks every publish to it for seconds. A
    # full queue with reject-publish refuses the same way: the handler's report is nacked until
    # the test removes that queue. Requeued at once, the command went through the work queue's
    # delivery limit (20) in well under a second and RabbitMQ dead-lettered it.
    from tests.unit.consumers.test_runner import ScriptedHandler  # one sync.completed each

    refuser = f"{topology.prefix}.refuser"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(
            refuser, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        channel.queue_bind(refuser, topology.exchange, "sync.completed")
        runner = MessageRunner(broker, topology, ScriptedHandler())
        consumer = QueueConsumer(broker, topology.queues()[0], runner, concurrency=1)
        consumer.start()
        broker.publish([out("sync.command", a_command())])
        eventually(lambda: runner.counts[Outcome.REQUEUED] >= 2)
        time.sleep(2.0)  # an immediate requeue would have used up the delivery limit by now
        refused = runner.counts[Outcome.REQUEUED]
        channel.queue_delete(refuser)
        eventually(lambda: runner.counts[Outcome.ACKED] == 1, 30)
        consumer.stop()
    finally:
        connection.close()

    assert 2 <= refused <= 6, f"{refused} requeues: the pauses (0.5 s, 1 s, 2 s, ...) were not kept"
    dead, _ = queue_info(amqp_url, topology.dead_queue(topology.sync_queue))
    assert dead == 0
