"""The pipeline on real RabbitMQ: role processes, outside events, poison messages, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pika
import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.topology import REASON_HEADER, Topology
from sfsync.bootstrap import running, track_run
from sfsync.oneshot import sync_once
from simulators import Faults
from tests.e2e.conftest import settings_env, settings_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def eventually(condition, seconds: float = 60.0) -> None:
    for attempt in Retrying(stop=stop_after_delay(seconds), wait=wait_fixed(0.1), reraise=True):
        with attempt:
            assert condition()


class Processes:
    """sfsync role processes of one test; all are stopped (or killed) at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            [sys.executable, "-m", "sfsync", *args], env={**self.env, **env}, stdout=log, stderr=log
        )
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> list[int]:
        codes = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
            proc.log.close()  # type: ignore[attr-defined]
        return codes


@pytest.fixture
def amqp_env(amqp_url: str, topology: Topology) -> dict[str, str]:
    return {
        "SFSYNC_BROKER_URL": amqp_url,
        "SFSYNC_PREFIX": topology.prefix,
        "SFSYNC_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes({}, tmp_path)
    yield procs
    procs.stop_all()


def wait_consuming(amqp_url: str, queue: str, consumers: int) -> None:
    def count() -> int:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        finally:
            connection.close()

    eventually(lambda: count() >= consumers, seconds=60)


def test_a_fleet_through_two_worker_processes_reaches_the_expected_state(
    start_fleet, fleet, tmp_path, amqp_url, topology, amqp_env, processes
) -> None:
    sims = start_fleet()
    env = settings_env(sims, tmp_path, **amqp_env)
    processes.env.update(env)
    metrics_port = free_port()
    processes.start("worker", "--concurrency", "4", SFSYNC_METRICS_PORT=str(metrics_port))
    processes.start("worker", "--concurrency", "4")
    processes.start("submitter")
    wait_consuming(amqp_url, topology.sync_queue, 2)
    wait_consuming(amqp_url, topology.provisioning_queue, 1)
    result = sync_once(settings_for(sims, tmp_path, **amqp_env), local_workers=False, timeout_s=120)
    # The first worker's Prometheus endpoint counts what it did.
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    handled = [
        float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line.startswith("sfsync_messages_total{")
        and 'type="sync.command"' in line
        and 'outcome="acked"' in line
    ]
    assert handled and 0 < handled[0] <= len(result.reports)
    assert "sfsync_http_requests_total{" in scraped
    assert len(result.reports) == len([c for c in fleet.customers if c.sharefile_enabled]) >= 50
    assert not result.failed and not result.failed_requests
    assert sims.sm_states() == fleet.expected
    assert sims.duplicate_effective_submissions() == 0
    # SIGTERM: each role stops consuming, finishes its work and exits 0.
    assert processes.stop_all() == [0, 0, 0]
    assert processes.logs().count("stopped cleanly") == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish_raw(amqp_url: str, exchange: str, routing_key: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def test_sync_requested_by_an_outside_system_syncs_that_one_customer(
    start_fleet, fleet, tmp_path, amqp_url, topology, amqp_env
) -> None:
    sims = start_fleet()
    settings = settings_for(sims, tmp_path, **amqp_env)
    target = next(c for c in fleet.customers if c.sharefile_enabled and c.sm_users)
    message_id = uuid.uuid4()
    event = {
        "message_id": str(message_id),
        "type": "sync.requested",
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "correlation_id": "crm-change-42",
        "payload": {"customer_id": target.id, "source": "crm", "reason": "user added"},
    }
    with running(settings, worker=True, submitter=True) as roles:
        tracker, listener = track_run(roles, settings, f"event-{message_id}")
        tracker.expect([target.id])
        publish_raw(amqp_url, topology.exchange, "sync.requested", json.dumps(event).encode())
        assert tracker.wait(60)
        listener.stop()
    assert list(tracker.result.reports) == [target.id]
    assert {s["customer_id"] for s in sims.submissions()} <= {target.id}
    assert sims.sm_states()[target.id] == fleet.expected[target.id]


def parked(amqp_url: str, queue: str) -> list[tuple[bytes, dict]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    found = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((body, properties.headers or {}))
    finally:
        connection.close()


def test_poison_messages_are_parked_with_a_reason_while_the_fleet_completes(
    start_fleet, fleet, tmp_path, amqp_url, topology, amqp_env
) -> None:
    sims = start_fleet()
    settings = settings_for(sims, tmp_path, **amqp_env)
    wrong_version = {
        "message_id": str(uuid.uuid4()),
        "type": "sync.command",
        "schema_version": 9,
        "occurred_at": "2026-11-27T00:00:00Z",
        "correlation_id": "x",
        "payload": {},
    }
    # Declare the topology first: a message published before its queue exists is unroutable.
    with running(settings, scheduler=True):
        pass
    publish_raw(amqp_url, topology.exchange, "sync.command", b"\x00\xffnot json")
    publish_raw(amqp_url, topology.exchange, "sync.command", json.dumps(wrong_version).encode())
    publish_raw(
        amqp_url, topology.exchange, "provisioning.requested", b'{"type": "provisioning.requested"}'
    )
    result = sync_once(settings, timeout_s=120)
    assert not result.failed
    assert sims.sm_states() == fleet.expected
    sync_dead = parked(amqp_url, topology.dead_queue(topology.sync_queue))
    provisioning_dead = parked(amqp_url, topology.dead_queue(topology.provisioning_queue))
    assert sorted(body for body, _ in sync_dead)[0] == b"\x00\xffnot json"
    reasons = [headers[REASON_HEADER] for _, headers in sync_dead + provisioning_dead]
    assert len(reasons) == 3
    assert any("unsupported schema_version 9" in r for r in reasons)
    assert all(r.startswith("invalid message:") for r in reasons)


def test_a_customer_whose_sharefile_keeps_timing_out_fails_alone_and_is_parked(
    start_fleet, fleet, tmp_path, amqp_url, topology, amqp_env
) -> None:
    broken = next(c for c in fleet.customers if c.sharefile_enabled)
    sims = start_fleet(
        sharefile_faults=Faults(timeout_customers=frozenset({broken.subdomain}), timeout_s=3)
    )
    settings = settings_for(
        sims,
        tmp_path,
        SFSYNC_HTTP_TIMEOUT_S="0.5",
        SFSYNC_HTTP_ATTEMPTS="2",
        SFSYNC_MAX_ATTEMPTS="2",
        **amqp_env,
    )
    result = sync_once(settings, timeout_s=120)
    assert [r.customer_id for r in result.failed] == [broken.id]
    assert (
        "timed out" in (result.reports[broken.id].error or "").lower()
        or "timeout" in (result.reports[broken.id].error or "").lower()
    )
    healthy = {c: s for c, s in fleet.expected.items() if c != broken.id}
    assert {c: s for c, s in sims.sm_states().items() if c != broken.id} == healthy
    [(body, headers)] = parked(amqp_url, topology.dead_queue(topology.sync_queue))
    assert broken.id in body.decode()
    assert "gave up after 2 attempts" in headers[REASON_HEADER]


def test_a_worker_killed_mid_message_is_redelivered_and_nothing_is_submitted_twice(
    start_fleet, fleet, tmp_path, amqp_url, topology, amqp_env, processes
) -> None:
    # Slow ShareFile answers keep the first worker busy with several customers when it dies.
    sims = start_fleet(sharefile_faults=Faults(latency_ms=150))
    env = settings_env(sims, tmp_path, **amqp_env)
    processes.env.update(env)
    victim = processes.start("worker", "--concurrency", "4")
    wait_consuming(amqp_url, topology.sync_queue, 1)
    settings = settings_for(sims, tmp_path, **amqp_env)
    with running(settings, submitter=True, scheduler=True) as roles:
        assert roles.scheduler is not None
        run_id = f"run-kill-{uuid.uuid4().hex[:6]}"
        tracker, listener = track_run(roles, settings, run_id)
        roles.scheduler.run_once(run_id=run_id, on_listed=tracker.expect)
        eventually(lambda: tracker.progress().reported >= 3, seconds=60)
        victim.send_signal(signal.SIGKILL)
        # Killed with work in hand (prefetch 4): the rest must come from redelivered messages.
        assert tracker.progress().reported < tracker.progress().customers
        victim.wait(10)
        processes.start("worker", "--concurrency", "4")
        assert tracker.wait(180), tracker.progress()
        listener.stop()
    assert not tracker.result.failed
    assert sims.sm_states() == fleet.expected
    assert sims.duplicate_effective_submissions() == 0
    request_ids = [s["request_id"] for s in sims.submissions() if not s["replayed"]]
    assert len(request_ids) == len(set(request_ids))
    assert tracker.result.reports.keys() == {c.id for c in fleet.customers if c.sharefile_enabled}
