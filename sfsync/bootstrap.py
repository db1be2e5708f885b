"""The composition root: settings → HTTP clients → broker → roles. Nothing else builds adapters."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from adapters.broker import Broker
from adapters.topology import Topology
from consumers.run_tracker import RunTracker
from consumers.runner import MessageRunner, QueueConsumer
from consumers.submitter import SubmitHandler
from consumers.sync_worker import SyncHandler
from domain.messages import Stamper
from domain.ports import ServicesManagerPort, ShareFilePort
from producers.scheduler import Scheduler
from sfsync.settings import Settings

log = logging.getLogger("sfsync")


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    return f"run-{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def default_stamper() -> Stamper:
    return Stamper(clock=utc_now, new_id=uuid.uuid4)


def build_topology(settings: Settings) -> Topology:
    return Topology(
        prefix=settings.prefix,
        retry_delay_ms=int(settings.retry_delay_s * 1000),
        delivery_limit=settings.delivery_limit,
    )


def build_broker(settings: Settings, *, name: str, topology: Topology | None = None) -> Broker:
    """The configured broker (memory:// or RabbitMQ), declaring `topology` (default: settings')."""
    topology = topology or build_topology(settings)
    if settings.uses_memory_broker:
        from adapters.memory import MemoryBroker

        return MemoryBroker(topology)
    from adapters.amqp import AmqpBroker, TlsFiles

    password = settings.broker_key_password
    tls = TlsFiles(
        ca_file=settings.broker_ca_file,
        cert_file=settings.broker_cert_file,
        key_file=settings.broker_key_file,
        key_password=password.get_secret_value() if password else None,
    )
    return AmqpBroker(
        settings.broker_url,
        topology,
        name=name,
        heartbeat_s=settings.heartbeat_s,
        tls=tls,
        max_message_bytes=settings.max_message_bytes,
    )


@dataclass
class Clients:
    """The HTTP side of a process: one pooled httpx client shared by both API clients."""

    sm: ServicesManagerPort
    sharefile: ShareFilePort | None
    close: Callable[[], None]


def build_clients(settings: Settings, *, need_sharefile: bool) -> Clients:
    from adapters.credentials import CredentialStore
    from adapters.http import RetryPolicy, new_http_client
    from adapters.services_manager import ServicesManagerClient
    from adapters.sharefile import ShareFileClient

    settings.require("sm_url", "sm_token")
    if need_sharefile:
        settings.require("sharefile_credentials_file")
    http = new_http_client(
        timeout_s=settings.http_timeout_s,
        connect_timeout_s=settings.http_connect_timeout_s,
        max_connections=max(100, settings.concurrency * settings.sharefile_max_concurrency * 2),
    )
    retry = RetryPolicy(attempts=settings.http_attempts, total_seconds=settings.http_total_s)
    assert settings.sm_url is not None and settings.sm_token is not None
    sm = ServicesManagerClient(
        settings.sm_url, settings.sm_token, http=http, retry=retry, page_size=settings.sm_page_size
    )
    sharefile = None
    if need_sharefile:
        assert settings.sharefile_credentials_file is not None
        sharefile = ShareFileClient(
            CredentialStore.from_file(settings.sharefile_credentials_file),
            token_url_template=settings.sharefile_token_url_template,
            api_url_template=settings.sharefile_api_url_template,
            http=http,
            retry=retry,
            max_concurrency_per_account=settings.sharefile_max_concurrency,
        )
    return Clients(sm=sm, sharefile=sharefile, close=http.close)


@dataclass
class Roles:
    """Started roles of one process, stopped in reverse order (consumers first, broker last)."""

    broker: Broker
    consumers: list[QueueConsumer] = field(default_factory=list)
    scheduler: Scheduler | None = None
    stamp: Stamper = field(default_factory=default_stamper)

    def stop(self) -> None:
        for consumer in reversed(self.consumers):
            consumer.stop()


@contextmanager
def running(
    settings: Settings,
    *,
    worker: bool = False,
    submitter: bool = False,
    scheduler: bool = False,
    name: str = "sfsync",
    overrides: dict[str, Any] | None = None,
) -> Iterator[Roles]:
    """Build and start the asked-for roles on one broker; stop them all on exit.

    `overrides` replaces real parts for tests: "broker", "sm", "sharefile", "stamp".
    """
    overrides = overrides or {}
    with ExitStack() as stack:
        sm = overrides.get("sm")
        sharefile = overrides.get("sharefile")
        if (worker or submitter or scheduler) and sm is None:
            clients = build_clients(settings, need_sharefile=worker and sharefile is None)
            stack.callback(clients.close)
            sm, sharefile = clients.sm, sharefile or clients.sharefile
        broker: Broker = overrides.get("broker") or build_broker(settings, name=name)
        if "broker" not in overrides:
            broker.start()
            stack.callback(broker.close)
        stamp: Stamper = overrides.get("stamp") or default_stamper()
        roles = Roles(broker=broker, stamp=stamp)
        stack.callback(roles.stop)
        topology = build_topology(settings)
        specs = {spec.name: spec for spec in topology.queues()}
        if worker:
            assert sm is not None and sharefile is not None
            handler = SyncHandler(sm=sm, sharefile=sharefile, policy=settings.policy(), stamp=stamp)
            roles.consumers.append(
                _consumer(broker, topology, specs[topology.sync_queue], handler, settings)
            )
        if submitter:
            assert sm is not None
            roles.consumers.append(
                _consumer(
                    broker,
                    topology,
                    specs[topology.provisioning_queue],
                    SubmitHandler(sm=sm, stamp=stamp),
                    settings,
                )
            )
        if scheduler:
            assert sm is not None
            roles.scheduler = Scheduler(sm=sm, broker=broker, stamp=stamp, new_run_id=new_run_id)
        for consumer in roles.consumers:
            consumer.start()
        yield roles


def _consumer(
    broker: Broker,
    topology: Topology,
    spec: Any,
    handler: Any,
    settings: Settings,
) -> QueueConsumer:
    runner = MessageRunner(
        broker=broker, topology=topology, handler=handler, max_attempts=settings.max_attempts
    )
    return QueueConsumer(broker, spec, runner, settings.concurrency)


def track_run(roles: Roles, settings: Settings, run_id: str) -> tuple[RunTracker, QueueConsumer]:
    """Listen to the events of one run on a queue of its own (it expires when left unused)."""
    topology = build_topology(settings)
    tracker = RunTracker(run_id)
    spec = topology.listener_queue(f"run.{run_id}")
    runner = MessageRunner(
        broker=roles.broker, topology=topology, handler=tracker, max_attempts=1, can_park=False
    )
    consumer = QueueConsumer(roles.broker, spec, runner, concurrency=4)
    consumer.start()
    return tracker, consumer
