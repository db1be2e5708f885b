"""How the RabbitMQ adapter chooses among a cluster's nodes, backs off, and sets up TLS.

No broker is needed: nodes that do not answer are local ports nobody listens on.
"""

from __future__ import annotations

import gc
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pika.exceptions
import psutil  # type: ignore[import-untyped]
import pytest
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorTransportSetupError,
)

import adapters.amqp as amqp
from adapters.amqp import AmqpBroker, TlsFiles, _tls_problem
from adapters.topology import Topology
from domain.errors import ConfigError, TransientError


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dead_urls() -> list[str]:
    # Not guest: an earlier test may have registered "guest" as a secret to redact from logs.
    return [f"amqp://backoff-test:unused@127.0.0.1:{closed_port()}/" for _ in range(3)]


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(amqp, "RECONNECT_INITIAL_S", 0.2)
    monkeypatch.setattr(amqp, "RECONNECT_MAX_S", 0.8)
    yield


def test_each_round_tries_every_node_once_then_backs_off_exponentially(
    dead_urls: list[str], fast_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sfsync.broker.amqp")
    broker = AmqpBroker(dead_urls, Topology(), name="backoff-test")
    with pytest.raises(TransientError, match="no RabbitMQ answered within 4s"):
        broker.start(timeout_s=4)
    rounds: list[list[str]] = [[]]
    waits: list[float] = []
    # The messages as logged (the log set-up may have formatted them already: no args to read).
    for message in (r.getMessage() for r in caplog.records if r.name == "sfsync.broker.amqp"):
        if message.startswith("connecting to "):
            rounds[-1].append(message.removeprefix("connecting to "))
        elif wait := re.fullmatch(r"no RabbitMQ node answered; trying again in (.+)s", message):
            waits.append(float(wait.group(1)))
            rounds.append([])
    complete = rounds[: len(waits)]
    assert len(complete) >= 3, rounds
    expected = sorted(amqp.redact_url(u) for u in dead_urls)
    assert all(sorted(r) == expected for r in complete), complete
    for k, wait in enumerate(waits):
        base = min(0.2 * 2**k, 0.8)  # doubling, capped; jitter is ±50 %; logged to 0.1 s
        assert 0.5 * base - 0.05 <= wait <= 1.5 * base + 0.05, (k, waits)


def test_after_a_lost_connection_the_other_nodes_come_first_in_random_order() -> None:
    urls = [f"amqp://u:p@node{n}:5672/" for n in (1, 2, 3)]
    broker = AmqpBroker(urls, Topology())
    lost = amqp.redact_url(urls[1])
    orders = [[url for url, _ in broker._endpoint_order(last=lost)] for _ in range(40)]
    assert all(order[-1] == lost and len(set(order)) == 3 for order in orders)
    assert {order[0] for order in orders} == {amqp.redact_url(urls[0]), amqp.redact_url(urls[2])}


def test_amqps_urls_verify_the_certificate_and_the_host_name(tmp_path: Path) -> None:
    broker = AmqpBroker(["amqps://u:p@rabbit.example:5671/", "amqp://u:p@plain:5672/"], Topology())
    (_, tls), (_, plain) = broker._parameters
    assert tls.ssl_options.server_hostname == "rabbit.example"
    assert tls.ssl_options.context.verify_mode is ssl.CERT_REQUIRED
    assert tls.ssl_options.context.check_hostname
    assert plain.ssl_options is None


def test_tls_files_that_cannot_be_loaded_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TLS CA file .*missing\.pem could not be loaded"):
        TlsFiles(ca_file=tmp_path / "missing.pem").context()
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate")
    with pytest.raises(ConfigError) as error:
        TlsFiles(cert_file=cert, key_password="k3y-pa55").context()
    assert f"TLS client certificate {cert} (key in it) could not be loaded" in str(error.value)
    assert "k3y-pa55" not in str(error.value)
    with pytest.raises(ConfigError):
        AmqpBroker(["amqps://u:p@rabbit:5671/"], Topology(), tls=TlsFiles(cert_file=cert))


def test_tls_failures_are_recognised_however_pika_wraps_them() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    wrapped = AMQPConnectionWorkflowFailed([AMQPConnectorTransportSetupError(verify)])
    assert _tls_problem(wrapped) == (
        "the broker's certificate was not accepted: unable to get local issuer certificate"
    )
    # An alert after the handshake (TLS 1.3: no client certificate) reaches us as text only.
    alert = pika.exceptions.IncompatibleProtocolError(
        "StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: "
        "TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)')\",)"
    )
    assert _tls_problem(alert) == "the TLS handshake failed: tlsv13 alert certificate required"
    assert _tls_problem(pika.exceptions.AMQPConnectionError("connection refused")) is None


@pytest.fixture
def no_gc() -> Iterator[None]:
    # Sockets left open are closed with the reference cycles pika makes, by the garbage collector:
    # with it off, only an explicit close can end a connection.
    gc.disable()
    yield
    gc.enable()


def test_closing_while_the_tcp_connect_is_pending_closes_the_socket(
    no_gc: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A full accept queue drops further SYNs on Linux, as a host that is down does: the broker's
    # connect stays pending until start() gives up and closes it.
    with socket.socket() as node:
        node.bind(("127.0.0.1", 0))
        node.listen(0)
        port = node.getsockname()[1]
        queued = [socket.socket() for _ in range(2)]
        for client in queued:
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
        time.sleep(0.2)
        broker = AmqpBroker([f"amqp://syn-test:unused@127.0.0.1:{port}/"], Topology())
        with pytest.raises(TransientError, match="no RabbitMQ answered within 1s"):
            broker.start(timeout_s=1)
        assert broker._thread is not None and not broker._thread.is_alive()
        ours = {c.getsockname() for c in queued}
        to_node = [
            c.laddr
            for c in psutil.Process().net_connections("tcp4")
            if c.raddr and c.raddr.port == port and tuple(c.laddr) not in ours
        ]
        for client in queued:
            client.close()
    assert to_node == []
    assert "could not connect" not in caplog.text  # it was closed, not refused


def test_closing_during_the_amqp_handshake_closes_the_socket_when_the_handshake_times_out(
    no_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node that accepts the connection but never speaks AMQP. pika cannot abort its handshake
    # (see AmqpBroker._close_now): close() waits for the handshake's own time-out, then the socket
    # is closed and the I/O thread ends.
    monkeypatch.setattr(amqp, "HANDSHAKE_TIMEOUT_S", 1.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(10)
        url = f"amqp://silent-test:unused@127.0.0.1:{silent.getsockname()[1]}/"
        broker = AmqpBroker([url], Topology())
        with pytest.raises(TransientError, match="no RabbitMQ answered within 0s"):
            broker.start(timeout_s=0.3)
        assert broker._thread is not None and not broker._thread.is_alive()
        accepted, _ = silent.accept()
        with accepted:
            accepted.settimeout(5)
            received = b""
            while chunk := accepted.recv(4096):  # the protocol header, then the end
                received += chunk
    assert received.startswith(b"AMQP")


def test_a_connection_that_opens_after_close_was_asked_is_closed_without_a_channel() -> None:
    class Opened:
        closed = False
        channels = 0

        def close(self) -> None:
            self.closed = True

        def channel(self, on_open_callback: object) -> None:
            self.channels += 1

    broker = AmqpBroker(["amqp://u:p@node1:5672/"], Topology())
    broker._closing.set()  # what close() does first
    connection = Opened()
    broker._on_connection_open(connection)  # type: ignore[arg-type]
    assert connection.closed and connection.channels == 0
