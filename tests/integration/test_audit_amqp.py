"""The audit role on RabbitMQ: its quorum queue is declared at start and every event is stored."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.amqp import AmqpBroker
from adapters.audit_store import AuditStore
from adapters.broker import Outgoing
from adapters.topology import Topology
from domain.messages import ProvisioningCompleted
from domain.records import ItemResult
from sfsync.audit import audit_role
from sfsync.settings import load_settings
from tests.conftest import SESSION_PREFIX, delete_topology
from tests.fakes import fixed_stamper

pytestmark = pytest.mark.broker


def test_the_audit_role_stores_events_published_on_rabbitmq(amqp_url: str, tmp_path: Path) -> None:
    prefix = f"{SESSION_PREFIX}-{uuid.uuid4().hex[:6]}"
    settings = load_settings(broker_url=amqp_url, prefix=prefix, retry_delay_s=0.3)
    topology = dataclasses.replace(Topology(prefix=prefix, retry_delay_ms=300), audit=True)
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    publisher = AmqpBroker([amqp_url], Topology(prefix=prefix, retry_delay_ms=300), name="t-pub")
    stamp = fixed_stamper()
    event = stamp(
        ProvisioningCompleted(
            customer_id="cust-1",
            run_id="run-1",
            request_id="req-1",
            items=(ItemResult(user_id="u-1", action="deprovision", status="accepted"),),
        ),
        correlation_id="run-1",
    )
    later = stamp(event.payload.model_copy(update={"request_id": "req-2"}), correlation_id="run-1")
    try:
        with audit_role(settings, store=store):
            publisher.start()
            # The second copy is a redelivery; one consumer thread on SQLite stores in order, so
            # once `later` is stored the duplicate has been handled too.
            publisher.publish([Outgoing.of(event), Outgoing.of(event), Outgoing.of(later)])
            for attempt in Retrying(stop=stop_after_delay(20), wait=wait_fixed(0.1), reraise=True):
                with attempt:
                    assert store.answered_request_ids("run-1") == {"req-1", "req-2"}
        assert store.table_counts()["audit_events"] == 2
    finally:
        publisher.close()
        store.close()
        delete_topology(amqp_url, topology)
