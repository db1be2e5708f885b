"""RabbitMQ drops every connection of a deployment mid-cycle (as a broker restart does): the roles
reconnect by themselves, nothing unconfirmed is lost, the cycle ends in the exact state."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import pika
import pytest

from adapters.amqp import AmqpBroker
from adapters.broker import Delivery, Outgoing
from adapters.topology import QueueSpec, Topology
from domain.errors import TransientError
from producers.scheduler import PUBLISH_BATCH
from sfsync.bootstrap import build_topology
from simulators import Faults, generate_fleet
from tests.e2e.conftest import settings_env, settings_for
from tests.reliability.conftest import (
    RECONNECT_LINE,
    ConnectionCloser,
    assert_exact_end_state,
    connection_states,
    cycle,
    drain,
    enabled_ids,
    eventually,
    wait_consuming,
)

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

CUSTOMERS = 400
# Share of the run reported when RabbitMQ closes every connection of the test.
CLOSE_AT = (0.2, 0.5)
# ShareFile's latency paces the cycle (about 16 s): after a close, the management API needs a few
# seconds to list the new connections, and the run must still be going when the next close comes.
SHAREFILE_LATENCY_MS = 250


def test_every_connection_closed_twice_mid_cycle_the_roles_reconnect_and_nothing_is_lost(
    start_sims, tmp_path, amqp_url, topology, amqp_env, processes, closer
) -> None:
    fleet = generate_fleet(CUSTOMERS, median_users=8, max_users=100, drift=0.05, seed=31)
    sims = start_sims(fleet, sharefile_faults=Faults(latency_ms=SHAREFILE_LATENCY_MS))
    processes.env.update(settings_env(sims, tmp_path, SFSYNC_CONCURRENCY="6", **amqp_env))
    workers = [processes.start("worker"), processes.start("worker")]
    submitter = processes.start("submitter")
    wait_consuming(amqp_url, topology.sync_queue, 2)
    wait_consuming(amqp_url, topology.provisioning_queue, 1)
    settings = settings_for(sims, tmp_path, **amqp_env)

    with cycle(settings) as run:
        # Two workers, the submitter, and this process's scheduler + listener.
        eventually(lambda: len(closer.connections()) == 4)
        run.start()
        for share in CLOSE_AT:
            eventually(lambda s=share: run.reported() >= s * len(enabled_ids(fleet)), 60)
            closed = closer.close_all("broker restart (chaos test)")
            assert len(closed) == 4
            assert not run.tracker.progress().done
            # Everyone comes back by itself, with its consumers re-subscribed.
            closer.wait_reconnected(4, closed)
        assert run.tracker.wait(120), run.tracker.progress()
        result = run.tracker.result

    assert set(result.reports) == enabled_ids(fleet)
    assert not result.failed and not result.failed_requests
    assert_exact_end_state(sims, fleet)
    for role in [*workers, submitter]:
        assert role.proc.poll() is None, role.log()
        assert len(RECONNECT_LINE.findall(role.log())) >= len(CLOSE_AT), role.log()
    print(f"duplicate reports after {len(CLOSE_AT)} closes: {result.duplicate_reports}")


class ClosedMidBatch:
    """The scheduler's broker, and RabbitMQ closing its connection while a batch is unconfirmed.

    On the scheduler's second batch the wrapper pauses the connection's I/O thread, hands the
    batch over (it is queued behind the pause), has RabbitMQ close the connection, then lets the
    I/O thread go on: the batch cannot be confirmed on a connection the broker has closed.
    """

    def __init__(self, inner: AmqpBroker, closer: ConnectionCloser, topology: Topology) -> None:
        self.inner = inner
        self.closer = closer
        self.topology = topology
        self.calls = 0
        self.failures: list[TransientError] = []

    def start(self) -> None:
        self.inner.start()

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.calls += 1
        if self.calls != 2:
            self.inner.publish(messages)
            return
        # The connection must be listed before it can be closed (management statistics lag).
        eventually(lambda: len(self.closer.connections()) == 1, 30)
        paused, resume = threading.Event(), threading.Event()
        # Reaching into the adapter is the only way to hold its I/O loop still; tests only.
        connection = self.inner._connection
        assert connection is not None
        connection.ioloop.add_callback_threadsafe(lambda: (paused.set(), resume.wait(30)))
        assert paused.wait(10)
        publishing = threading.Thread(target=self._publish_recording, args=(messages,))
        publishing.start()
        closed = self.closer.close_all("broker restart mid-publish (chaos test)")
        # The management API closes asynchronously: go on only once the broker's side of the
        # connection has stopped running (it then ignores every frame but close-ok).
        eventually(lambda: "running" not in connection_states(self.topology), 30)
        resume.set()
        publishing.join(60)
        assert len(closed) == 1 and self.failures, "the batch was confirmed despite the close"
        raise self.failures[-1]

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        return self.inner.publish_async(messages)

    def _publish_recording(self, messages: Sequence[Outgoing]) -> None:
        try:
            self.inner.publish(messages)
        except TransientError as exc:
            self.failures.append(exc)

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        self.inner.consume(queue, on_delivery, prefetch)

    def cancel(self, queue: str) -> None:
        self.inner.cancel(queue)

    def close(self) -> None:
        self.inner.close()


def test_a_connection_closed_while_the_scheduler_publishes_2000_commands_loses_none(
    start_sims, tmp_path, amqp_url, topology, amqp_env, closer
) -> None:
    fleet = generate_fleet(4, seed=3)
    sims = start_sims(fleet)
    settings = settings_for(sims, tmp_path, **amqp_env)
    customers = [f"cust-big-{n:05d}" for n in range(2 * PUBLISH_BATCH)]
    broker = ClosedMidBatch(
        AmqpBroker([amqp_url], build_topology(settings), name="sfsync-scheduler"),
        closer,
        topology,
    )
    broker.start()
    try:
        # No worker consumes: the sync queue shows exactly what the scheduler got through.
        with cycle(settings, customer_ids=customers, overrides={"broker": broker}) as run:
            run.start()
    finally:
        broker.close()

    assert broker.failures and broker.calls == 3  # batch 1, batch 2 (lost), batch 2 again
    commands = Counter(
        json.loads(body)["payload"]["customer_id"]
        for body, _ in drain(amqp_url, topology.sync_queue)
    )
    assert set(commands) == set(customers)
    # At least once: a command may have been routed before the close; it is then there twice.
    assert sum(commands.values()) <= len(customers) + PUBLISH_BATCH


@pytest.mark.parametrize("role", ["worker", "audit"])
def test_a_role_whose_topology_rabbitmq_refuses_on_a_reconnect_exits_instead_of_idling(
    role, start_sims, tmp_path, amqp_url, topology, amqp_env, processes, closer
) -> None:
    # The README's way to change SFSYNC_RETRY_DELAY_S: delete the retry queues and start the new
    # deployment, which declares them with the new TTL. Old roles that reconnect after that
    # (a network blip) are refused the topology: they used to stay up, consume nothing, and
    # say "stopped cleanly" (exit 0) on SIGTERM, so nothing ever restarted them.
    sims = start_sims(generate_fleet(2, median_users=4, max_users=8, drift=0.2, seed=5))
    processes.env.update(settings_env(sims, tmp_path, **amqp_env))
    queue = topology.audit_queue if role == "audit" else topology.sync_queue
    started = processes.start(role)
    wait_consuming(amqp_url, queue, 1)

    retry = Topology.retry_queue(queue)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_delete(retry)
        arguments = {"x-queue-type": "quorum", "x-message-ttl": 1234}
        arguments |= {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        channel.queue_declare(retry, durable=True, arguments=arguments)
    finally:
        connection.close()
    eventually(lambda: len(closer.connections()) == 1, 30)  # management stats lag a little
    closer.close_all("a network blip")

    try:
        eventually(lambda: started.proc.poll() is not None, 30)
    except AssertionError:
        raise AssertionError(started.log()) from None
    assert started.proc.returncode == 2, started.log()
    assert "RabbitMQ refused the topology" in started.log()
    assert "stopped cleanly" not in started.log()
