"""`sfsync status` against real RabbitMQ: depths from the management API, and from AMQP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlparse

import httpx
import pika
import pytest
from click.testing import CliRunner
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from adapters.amqp import AmqpBroker
from adapters.broker import Outgoing
from adapters.topology import Topology
from sfsync.cli.ops import status
from sfsync.status import SOURCE_AMQP, SOURCE_MANAGEMENT, StatusReport, collect_status

pytestmark = pytest.mark.broker

MANAGEMENT_PORT = 15672
# The management API refreshes queue counts every few seconds (collect_statistics_interval).
STATS_WAIT_S = 45
PLUGIN_WAIT_S = 90
COMMANDS = 7
PARKED = 2


def _management_answers(url: str) -> bool:
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/overview", timeout=3)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@pytest.fixture(scope="session")
def management_url(amqp_url: str) -> str:
    """MANAGEMENT_URL, or the broker host's :15672 with the AMQP credentials.

    When the API does not answer, the local broker's management plugin is enabled
    (`rabbitmq-plugins enable rabbitmq_management`) and awaited. Under CI=true a management API
    that still does not answer fails the test; elsewhere it skips.
    """
    amqp = urlparse(amqp_url)
    url = os.environ.get("MANAGEMENT_URL") or (
        f"http://{amqp.username or 'guest'}:{amqp.password or 'guest'}"
        f"@{amqp.hostname or '127.0.0.1'}:{MANAGEMENT_PORT}"
    )
    if _management_answers(url):
        return url
    problem = _enable_management_plugin()
    if problem is None:
        try:
            for attempt in Retrying(
                stop=stop_after_delay(PLUGIN_WAIT_S),
                wait=wait_fixed(1),
                retry=retry_if_exception_type(AssertionError),
                reraise=True,
            ):
                with attempt:
                    assert _management_answers(url)
            return url
        except AssertionError:
            problem = f"the management API did not answer within {PLUGIN_WAIT_S}s"
    message = f"no RabbitMQ management API at {httpx.URL(url).host}:{MANAGEMENT_PORT}: {problem}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _enable_management_plugin() -> str | None:
    """Enable the plugin on the local node; the reason when that is impossible."""
    try:
        done = subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run rabbitmq-plugins: {exc}"
    if done.returncode != 0:
        return f"rabbitmq-plugins failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


@pytest.fixture
def loaded_topology(amqp_url: str, topology: Topology) -> Iterator[Topology]:
    """The test topology declared, with COMMANDS sync commands waiting and PARKED parked ones."""
    broker = AmqpBroker([amqp_url], topology, name="sfsync-test-status")
    broker.start()
    try:
        broker.publish(
            [
                Outgoing(
                    routing_key="sync.command",
                    body=b"{}",
                    message_id=f"m-{n}",
                    correlation_id="run-status",
                    type="sync.command",
                )
                for n in range(COMMANDS)
            ]
        )
        broker.publish(
            [
                Outgoing(
                    routing_key=topology.dead_queue(topology.sync_queue),
                    body=b"not json",
                    message_id=f"p-{n}",
                    correlation_id="run-status",
                    type="sync.command",
                    exchange="",
                )
                for n in range(PARKED)
            ]
        )
    finally:
        broker.close()
    yield topology


@pytest.fixture
def listener_queue(amqp_url: str, loaded_topology: Topology) -> Iterator[str]:
    """A one-shot run's listener queue, which AMQP alone cannot discover."""
    name = loaded_topology.listener_queue("run.run-42").name
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().queue_declare(name, durable=True, arguments={"x-expires": 600_000})
        yield name
        connection.channel().queue_delete(name)
    finally:
        connection.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _depths(report: StatusReport) -> dict[str, int | None]:
    return {row.name: row.ready for row in report.queues}


def test_management_source_shows_depths_parked_messages_rates_and_listener_queues(
    management_url: str, amqp_url: str, loaded_topology: Topology, listener_queue: str
) -> None:
    topo = loaded_topology
    sync, dead = topo.sync_queue, topo.dead_queue(topo.sync_queue)
    for attempt in Retrying(
        stop=stop_after_delay(STATS_WAIT_S),
        wait=wait_fixed(1),
        retry=retry_if_exception_type(AssertionError),
        reraise=True,
    ):
        with attempt:
            report = collect_status(topo, management_url=management_url, amqp_url=amqp_url)
            depths = _depths(report)
            assert depths.get(sync) == COMMANDS and depths.get(dead) == PARKED
            # The queue's message counts and its consumer count arrive in separate statistics
            # events: a loaded broker can show the first a few seconds before the second.
            row = next(row for row in report.queues if row.name == sync)
            assert row.unacked == 0 and row.consumers == 0
    assert report.source == SOURCE_MANAGEMENT and report.rates_available
    assert report.notes == []
    assert {row.name for row in report.queues} == {
        *(spec.name for spec in topo.queues()),
        listener_queue,
    }
    rows = {row.name: row for row in report.queues}
    assert rows[listener_queue].kind == "listener"
    assert rows[sync].publish_rate is not None and rows[sync].deliver_rate is not None
    assert report.parked == PARKED

    result = CliRunner().invoke(
        status,
        ["--json"],
        env={
            "SFSYNC_PREFIX": topo.prefix,
            "SFSYNC_BROKER_URL": amqp_url,
            "SFSYNC_MANAGEMENT_URL": management_url,
        },
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["source"] == SOURCE_MANAGEMENT and data["parked"] == PARKED
    assert {q["name"]: q["ready"] for q in data["queues"]}[sync] == COMMANDS
    assert f":{httpx.URL(management_url).password}@" not in result.output


def test_table_output_makes_parked_messages_stand_out(
    management_url: str, amqp_url: str, loaded_topology: Topology
) -> None:
    dead = loaded_topology.dead_queue(loaded_topology.sync_queue)
    env = {
        "SFSYNC_PREFIX": loaded_topology.prefix,
        "SFSYNC_BROKER_URL": amqp_url,
        "SFSYNC_MANAGEMENT_URL": management_url,
        "COLUMNS": "200",
    }
    for attempt in Retrying(
        stop=stop_after_delay(STATS_WAIT_S),
        wait=wait_fixed(1),
        retry=retry_if_exception_type(AssertionError),
        reraise=True,
    ):
        with attempt:
            result = CliRunner().invoke(status, [], env=env)
            assert result.exit_code == 0, result.output
            assert f"WARNING: {PARKED} message(s) parked in {dead}" in result.output
    assert "parked" in result.output
    assert "source: management-api at http://" in result.output
    assert ":guest@" not in result.output


def test_without_the_management_api_depths_come_from_amqp_and_rates_are_unavailable(
    amqp_url: str, loaded_topology: Topology
) -> None:
    topo = loaded_topology
    closed = f"http://guest:guest@127.0.0.1:{closed_port()}"
    report = collect_status(topo, management_url=closed, amqp_url=amqp_url)
    assert report.source == SOURCE_AMQP and not report.rates_available
    depths = _depths(report)
    assert depths[topo.sync_queue] == COMMANDS
    assert depths[topo.dead_queue(topo.sync_queue)] == PARKED
    assert depths[topo.provisioning_queue] == 0
    assert all(row.publish_rate is None and row.unacked is None for row in report.queues)
    assert report.parked == PARKED
    assert any("management API unavailable" in note for note in report.notes)

    result = CliRunner().invoke(
        status,
        [],
        env={
            "SFSYNC_PREFIX": topo.prefix,
            "SFSYNC_BROKER_URL": amqp_url,
            "SFSYNC_MANAGEMENT_URL": closed,
            "COLUMNS": "200",
        },
    )
    assert result.exit_code == 0, result.output
    assert "source: amqp-passive-declare at amqp://guest:***@" in result.output
    assert "rates and unacked counts unavailable" in result.output
    assert f"WARNING: {PARKED} message(s) parked" in result.output
    assert ":guest@" not in result.output


def test_status_asks_the_next_node_when_the_first_is_down(
    amqp_url: str, loaded_topology: Topology
) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    result = CliRunner().invoke(
        status,
        ["--json"],
        env={"SFSYNC_PREFIX": loaded_topology.prefix, "SFSYNC_BROKER_URL": f"{down},{amqp_url}"},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parked"] == PARKED


def test_amqp_source_marks_queues_that_do_not_exist(amqp_url: str, topology: Topology) -> None:
    # Nothing declared under this prefix: every queue is reported missing, none crashes the probe.
    report = collect_status(topology, management_url=None, amqp_url=amqp_url)
    assert report.source == SOURCE_AMQP
    assert [row.exists for row in report.queues] == [False] * len(topology.queues())
    assert "SFSYNC_MANAGEMENT_URL is not set" in report.notes


def test_amqp_source_shows_the_audit_queues_when_they_exist(
    amqp_url: str, loaded_topology: Topology
) -> None:
    audit = [spec.name for spec in replace(loaded_topology, audit=True).queues()][-3:]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in audit:
            channel.queue_declare(name, durable=True)
        channel.basic_publish("", audit[-1], b"parked audit event")
        report = collect_status(loaded_topology, management_url=None, amqp_url=amqp_url)
    finally:
        for name in audit:
            connection.channel().queue_delete(name)
        connection.close()
    rows = {row.name: row for row in report.queues}
    assert [rows[name].kind for name in audit] == ["work", "retry", "parking"]
    assert rows[audit[-1]].ready == 1
    assert report.parked == PARKED + 1
