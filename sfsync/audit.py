"""Wiring of the audit trail: its store, a broker declaring its queue, and its consumer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from adapters.audit_store import AuditStore
from adapters.broker import Broker
from adapters.memory import MemoryBroker
from adapters.topology import Topology
from consumers.audit import AuditHandler
from consumers.run_tracker import RunResult
from consumers.runner import MessageRunner, QueueConsumer
from sfsync.bootstrap import Roles, build_broker, build_topology, running
from sfsync.settings import Settings

log = logging.getLogger("sfsync.audit")

# How long a one-shot command waits for the audit consumer to store the run's last events.
RECORD_WAIT_S = 30.0
RECORD_POLL_S = 0.1


def open_store(settings: Settings) -> AuditStore:
    """Open SFSYNC_DATABASE_URL and bring its schema up to date (ConfigError on a bad URL)."""
    return AuditStore.open(settings.database_url.get_secret_value())


def audit_topology(settings: Settings) -> Topology:
    return dataclasses.replace(build_topology(settings), audit=True)


def build_audit_broker(settings: Settings, *, name: str) -> Broker:
    """Like bootstrap.build_broker, but its topology declares `<prefix>.audit` (and its retry and
    parking queues) at every (re)connect, so that no event published after start is missed."""
    return build_broker(settings, name=name, topology=audit_topology(settings))


def start_audit_consumer(broker: Broker, settings: Settings, store: AuditStore) -> QueueConsumer:
    topology = audit_topology(settings)
    [spec] = [q for q in topology.queues() if q.name == topology.audit_queue]
    runner = MessageRunner(
        broker=broker,
        topology=topology,
        handler=AuditHandler(store),
        max_attempts=settings.max_attempts,
    )
    # SQLite takes one writer at a time: more threads would only wait for its lock.
    concurrency = 1 if store.engine.dialect.name == "sqlite" else settings.concurrency
    consumer = QueueConsumer(broker, spec, runner, concurrency)
    consumer.start()
    return consumer


@contextmanager
def audit_role(
    settings: Settings, *, store: AuditStore | None = None, broker: Broker | None = None
) -> Iterator[AuditStore]:
    """The long-running audit role: consume `<prefix>.audit` into the store until exit."""
    with ExitStack() as stack:
        if store is None:
            store = open_store(settings)
            stack.callback(store.close)
        if broker is None:
            broker = build_audit_broker(settings, name="sfsync-audit")
            broker.start()
            stack.callback(broker.close)
        consumer = start_audit_consumer(broker, settings, store)
        stack.callback(consumer.stop)
        yield store


@contextmanager
def running_with_audit(
    settings: Settings,
    *,
    store: AuditStore | None,
    name: str,
    overrides: dict[str, Any] | None = None,
    worker: bool = False,
    submitter: bool = False,
    scheduler: bool = False,
) -> Iterator[Roles]:
    """bootstrap.running(...) plus an audit consumer writing to `store` (plain running() when
    `store` is None). A broker given in `overrides` must have an audit-enabled topology."""
    overrides = dict(overrides or {})
    with ExitStack() as stack:
        if store is not None:
            if "broker" not in overrides:
                broker = build_audit_broker(settings, name=name)
                broker.start()
                stack.callback(broker.close)
                overrides["broker"] = broker
            # Started before the roles, so that it stops after them: a request the submitter
            # finishes while stopping (a timeout, Ctrl-C) has changed Services Manager, and its
            # answer must reach the audit trail too.
            consumer = start_audit_consumer(overrides["broker"], settings, store)
            stack.callback(_drain_then_stop, overrides["broker"], consumer)
        started = stack.enter_context(
            running(
                settings,
                worker=worker,
                submitter=submitter,
                scheduler=scheduler,
                name=name,
                overrides=overrides,
            )
        )
        yield started


def _drain_then_stop(broker: Broker, consumer: QueueConsumer, timeout_s: float = 30.0) -> None:
    """Stop the audit consumer once the events already in its in-process queue are stored.
    (On RabbitMQ the queue outlives this process: the audit role stores what is left.)"""
    if isinstance(broker, MemoryBroker):
        queue = consumer.queue.name
        drained = Retrying(
            stop=stop_after_delay(timeout_s),
            wait=wait_fixed(RECORD_POLL_S),
            retry=retry_if_result(lambda done: not done),
        )
        with contextlib.suppress(RetryError):
            drained(lambda: broker.depth(queue) == 0 and consumer.wait_idle(0))
    consumer.stop()


def wait_until_recorded(
    store: AuditStore, result: RunResult, timeout_s: float = RECORD_WAIT_S
) -> bool:
    """Wait until the store holds every report and answer the run's tracker received, so that
    `sfsync why` right after a one-shot command sees the whole run."""
    wanted_reports = set(result.reports)
    wanted_answers = set(result.answers)

    def recorded() -> bool:
        return wanted_reports <= store.reported_customers(
            result.run_id
        ) and wanted_answers <= store.answered_request_ids(result.run_id)

    waiting = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(RECORD_POLL_S),
        retry=retry_if_result(lambda done: not done),
    )
    try:
        waiting(recorded)
    except RetryError:
        log.warning("audit trail of run %s incomplete after %.0fs", result.run_id, timeout_s)
        return False
    return True
