"""The audit role on the memory broker: every event of a run stored once; bad ones parked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.audit_store import AuditStore
from adapters.broker import Outgoing
from adapters.memory import MemoryBroker
from adapters.topology import AUDIT_KEYS, EVENT_KEYS, Topology
from consumers.audit import AuditHandler
from domain.errors import TransientError
from domain.messages import (
    Envelope,
    ProvisioningCompleted,
    SyncCommand,
)
from domain.records import ItemResult
from sfsync.audit import audit_role
from sfsync.settings import load_settings
from tests.fakes import fixed_stamper

STAMP = fixed_stamper()


def eventually(check: Any, timeout: float = 10) -> None:
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            check()


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    started = MemoryBroker(Topology(prefix="t", retry_delay_ms=50, audit=True))
    started.start()
    yield started
    started.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    opened = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    yield opened
    opened.close()


def answer(request_id: str = "req-1") -> Envelope[ProvisioningCompleted]:
    payload = ProvisioningCompleted(
        customer_id="cust-1",
        run_id="run-1",
        request_id=request_id,
        items=(ItemResult(user_id="u-1", action="deprovision", status="accepted"),),
    )
    return STAMP(payload, correlation_id="run-1")


def test_only_an_audit_enabled_topology_declares_the_audit_queue_bound_to_every_event() -> None:
    assert all(".audit" not in q.name for q in Topology().queues())
    names = {q.name: q for q in Topology(audit=True).queues()}
    assert {"sfsync.audit", "sfsync.audit.retry", "sfsync.audit.dead"} <= set(names)
    assert set(EVENT_KEYS) | {"provisioning.requested", "sync.command"} <= set(
        names["sfsync.audit"].routing_keys
    )
    assert names["sfsync.audit"].routing_keys == AUDIT_KEYS and names["sfsync.audit"].quorum


def test_every_published_event_and_command_is_stored(
    broker: MemoryBroker, store: AuditStore
) -> None:
    settings = load_settings(prefix="t")
    command = STAMP(SyncCommand(customer_id="cust-1", run_id="run-1"), correlation_id="run-1")
    with audit_role(settings, store=store, broker=broker):
        broker.publish([Outgoing.of(command), Outgoing.of(answer())])
        eventually(lambda: _assert_counts(store, audit_events=2, audit_commands=1, audit_answers=1))


def test_a_redelivered_event_is_stored_once(broker: MemoryBroker, store: AuditStore) -> None:
    settings = load_settings(prefix="t")
    event = Outgoing.of(answer())
    with audit_role(settings, store=store, broker=broker):
        broker.publish([event])
        eventually(lambda: _assert_counts(store, audit_events=1))
        broker.publish([event])  # same message_id, as after a lost ack
        eventually(lambda: _assert_drained(broker, "t.audit"))
    _assert_counts(store, audit_events=1, audit_answers=1, audit_answer_items=1)


def test_an_undecodable_message_is_parked_and_the_next_one_stored(
    broker: MemoryBroker, store: AuditStore
) -> None:
    settings = load_settings(prefix="t")
    junk = Outgoing(
        routing_key="sync.completed",
        body=b"{not json",
        message_id="x",
        correlation_id="c",
        type="?",
    )
    with audit_role(settings, store=store, broker=broker):
        broker.publish([junk, Outgoing.of(answer())])
        eventually(lambda: _assert_counts(store, audit_events=1))
        eventually(lambda: _assert_depth(broker, "t.audit.dead", 1))


class FlakyStore:
    """Fails like an unreachable database `failures` times, then stores into `inner`."""

    def __init__(self, inner: AuditStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.calls = 0
        self.engine = inner.engine

    def record(self, message: Envelope[Any]) -> bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("audit database unavailable: connection refused")
        return self.inner.record(message)


def test_an_unreachable_database_delays_the_event_instead_of_losing_it(
    broker: MemoryBroker, store: AuditStore
) -> None:
    settings = load_settings(prefix="t", max_attempts=5)
    flaky = FlakyStore(store, failures=2)
    with audit_role(settings, store=flaky, broker=broker):  # type: ignore[arg-type]
        broker.publish([Outgoing.of(answer())])
        eventually(lambda: _assert_counts(store, audit_events=1))
    assert flaky.calls == 3
    assert broker.depth("t.audit.dead") == 0


def test_the_handler_publishes_nothing(store: AuditStore) -> None:
    handler = AuditHandler(store)
    assert handler.handle(answer()) == []
    assert handler.handle(answer()) == []


def _assert_counts(store: AuditStore, **expected: int) -> None:
    counts = store.table_counts()
    assert {name: counts[name] for name in expected} == expected


def _assert_depth(broker: MemoryBroker, queue: str, depth: int) -> None:
    assert broker.depth(queue) == depth


def _assert_drained(broker: MemoryBroker, queue: str) -> None:
    assert broker.depth(queue) == 0
