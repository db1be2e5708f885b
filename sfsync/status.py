"""`sfsync status`: depth, consumers and rates of every sfsync queue, from the best source."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pika
from rich.console import Console
from rich.table import Table

from adapters.amqp import redact_url
from adapters.rabbitmq_management import (
    ManagementClient,
    ManagementUnavailable,
    QueueStats,
    passive_queue_stats,
)
from adapters.topology import Topology
from domain.errors import TransientError
from sfsync.logs import redact

SOURCE_MANAGEMENT = "management-api"
SOURCE_AMQP = "amqp-passive-declare"


@dataclass(frozen=True)
class QueueRow:
    """One queue as `status` shows it: its role in the topology and its numbers."""

    name: str
    kind: str  # work | retry | parking | listener (any other `<prefix>.` queue)
    ready: int | None
    unacked: int | None
    consumers: int | None
    publish_rate: float | None
    deliver_rate: float | None
    exists: bool = True

    @property
    def parked(self) -> int:
        return (self.ready or 0) + (self.unacked or 0) if self.kind == "parking" else 0


@dataclass(frozen=True)
class StatusReport:
    prefix: str
    source: str  # SOURCE_MANAGEMENT or SOURCE_AMQP
    source_url: str  # without credentials
    rates_available: bool
    queues: list[QueueRow]
    notes: list[str] = field(default_factory=list)

    @property
    def parked(self) -> int:
        return sum(row.parked for row in self.queues)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, queue in zip(data["queues"], self.queues, strict=True):
            row["parked"] = queue.parked
        data["parked"] = self.parked
        return data


class StatusUnavailable(TransientError):
    """Neither the management API nor AMQP answered."""


def kind_of(name: str, topology: Topology) -> str:
    if name.endswith(".dead"):
        return "parking"
    if name.endswith(".retry"):
        return "retry"
    if name in _work_queues(topology):
        return "work"
    return "listener"


def _every_queue(topology: Topology) -> list[str]:
    """The queues of every role, the audit role's included, in topology order."""
    return [spec.name for spec in replace(topology, audit=True).queues()]


def _work_queues(topology: Topology) -> set[str]:
    return {spec.name for spec in replace(topology, audit=True).queues() if spec.routing_keys}


def collect_status(
    topology: Topology,
    *,
    management_url: str | None,
    amqp_url: str | None,
    vhost: str | None = None,
    management_client: Callable[[str, str], ManagementClient] | None = None,
) -> StatusReport:
    """Ask the management API first; without it, a passive declare per known queue over AMQP.

    `vhost` defaults to the AMQP URL's (or "/"). Raises StatusUnavailable if neither answers.
    """
    if vhost is None:
        vhost = pika.URLParameters(amqp_url).virtual_host if amqp_url else "/"
    notes: list[str] = []
    if management_url:
        make = management_client or (lambda url, vh: ManagementClient(url, vhost=vh))
        client = make(management_url, vhost)
        try:
            with client:
                stats = client.queues(topology.prefix)
        except ManagementUnavailable as exc:
            notes.append(f"management API unavailable ({redact(str(exc))})")
        else:
            return StatusReport(
                prefix=topology.prefix,
                source=SOURCE_MANAGEMENT,
                source_url=client.display_url,
                rates_available=True,
                queues=_rows(stats, topology, known=_every_queue(topology)),
            )
    else:
        notes.append("SFSYNC_MANAGEMENT_URL is not set")
    if amqp_url is None:
        raise StatusUnavailable("; ".join([*notes, "and no amqp:// broker URL is configured"]))
    known = _every_queue(topology)
    # The audit role is optional: its queues are shown when they exist, never as missing.
    expected = {spec.name for spec in topology.queues()}
    try:
        stats = [s for s in passive_queue_stats(amqp_url, known) if s.exists or s.name in expected]
    except TransientError as exc:
        raise StatusUnavailable("; ".join([*notes, redact(str(exc))])) from None
    notes.append(
        "depths from AMQP: rates and unacked counts unavailable, listener queues not listed"
    )
    return StatusReport(
        prefix=topology.prefix,
        source=SOURCE_AMQP,
        source_url=redact_url(amqp_url),
        rates_available=False,
        queues=_rows(stats, topology, known=known),
        notes=notes,
    )


def _rows(stats: list[QueueStats], topology: Topology, *, known: list[str]) -> list[QueueRow]:
    order = {name: index for index, name in enumerate(known)}
    rows = [
        QueueRow(
            name=s.name,
            kind=kind_of(s.name, topology),
            ready=s.ready,
            unacked=s.unacked,
            consumers=s.consumers,
            publish_rate=s.publish_rate,
            deliver_rate=s.deliver_rate,
            exists=s.exists,
        )
        for s in stats
    ]
    return sorted(rows, key=lambda r: (order.get(r.name, len(order)), r.name))


def render_json(report: StatusReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"


def render_table(report: StatusReport, console: Console) -> None:
    table = Table(title=f"sfsync queues (prefix {report.prefix})")
    longest = max((len(row.name) + 10 for row in report.queues), default=5)
    for column in ("queue", "kind", "ready", "unacked", "consumers", "publish/s", "deliver/s"):
        table.add_column(
            column,
            justify="left" if column in ("queue", "kind") else "right",
            # Queue names are copied into other commands: never shortened.
            min_width=longest if column == "queue" else None,
        )
    table.add_column("parked", justify="right", style="bold")
    for row in report.queues:
        parked = "" if row.kind != "parking" else str(row.parked)
        if row.parked:
            parked = f"[bold red]{parked}[/]"
        table.add_row(
            row.name if row.exists else f"{row.name} (missing)",
            row.kind,
            _count(row.ready),
            _count(row.unacked),
            _count(row.consumers),
            _rate(row.publish_rate),
            _rate(row.deliver_rate),
            parked,
        )
    console.print(table)
    console.print(f"source: {report.source} at {report.source_url}")
    for note in report.notes:
        console.print(f"note: {note}")
    if not report.queues:
        console.print(f"no queues named {report.prefix}.* (is the prefix right?)")
    for row in report.queues:
        if row.parked:
            console.print(
                f"[bold red]WARNING[/]: {row.parked} message(s) parked in {row.name}; "
                "see their x-sfsync-reason header"
            )


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
