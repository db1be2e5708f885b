"""Test-session wiring: where the real RabbitMQ is, and a unique name prefix per test."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pika
import pytest

from adapters.topology import Topology

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Every name a test declares starts with this session's own prefix.
SESSION_PREFIX = f"sfsync-t{uuid.uuid4().hex[:6]}"
log = logging.getLogger("tests")


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=2
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    """Whether a Docker engine answers (a Docker client alone, as on our CI, is not enough)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    else:
        parsed = urlparse(host)
        family, address = socket.AF_INET, (parsed.hostname or "127.0.0.1", parsed.port or 2375)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            head = sock.recv(64)
        except OSError:
            return False
    return head.startswith(b"HTTP/1.") and b" 200 " in head


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP_URL if set; else a testcontainers RabbitMQ when Docker runs; else the local broker.

    Under CI=true a missing broker fails the test: broker tests never skip silently there.
    """
    url = os.environ.get("AMQP_URL")
    if url is None and _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    url = url or LOCAL_AMQP_URL
    if not _answers(url):
        message = f"no RabbitMQ answers at {url} (set AMQP_URL, or start rabbitmq-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield url
    # Listener queues of one-shot runs and anything else a test left behind under our prefix.
    _sweep(url)


@pytest.fixture
def topology(amqp_url: str) -> Iterator[Topology]:
    """A topology with a unique prefix; every queue and the exchange are deleted afterwards."""
    topo = Topology(
        prefix=f"{SESSION_PREFIX}-{uuid.uuid4().hex[:6]}", retry_delay_ms=300, delivery_limit=5
    )
    yield topo
    delete_topology(amqp_url, topo)


def delete_topology(amqp_url: str, topo: Topology) -> None:
    _delete(amqp_url, [spec.name for spec in topo.queues()], [topo.exchange])


def _delete(amqp_url: str, queues: list[str], exchanges: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for name in queues:
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):  # already gone
                connection.channel().queue_delete(name)
        for name in exchanges:
            connection.channel().exchange_delete(name)
    finally:
        connection.close()


def _sweep(amqp_url: str) -> None:
    """Delete every queue and exchange of this session (listed by the local rabbitmqctl)."""
    listed: dict[str, list[str]] = {}
    for kind in ("queues", "exchanges"):
        try:
            out = subprocess.run(
                ["rabbitmqctl", "-q", f"list_{kind}", "name"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return  # not the local broker: a testcontainers broker goes away by itself
        listed[kind] = [n.strip() for n in out.splitlines() if n.strip().startswith(SESSION_PREFIX)]
    if listed["queues"] or listed["exchanges"]:
        _delete(amqp_url, listed["queues"], listed["exchanges"])
