"""The broker topology: one topic exchange, work queues, their retry and parking queues, by name."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Routing keys are message types. Work queues bind the commands; events go to whoever listens.
SYNC_KEYS = ("sync.command", "sync.requested")
PROVISIONING_KEYS = ("provisioning.requested",)
EVENT_KEYS = (
    "sync.completed",
    "sync.held",
    "sync.failed",
    "provisioning.completed",
    "provisioning.failed",
)
# The audit trail records every event plus the requests and commands that explain them.
AUDIT_KEYS = (*EVENT_KEYS, *PROVISIONING_KEYS, *SYNC_KEYS)

# Headers the runner writes; they travel with a message through retry and parking queues.
ATTEMPT_HEADER = "x-sfsync-attempt"
REASON_HEADER = "x-sfsync-reason"
FROM_QUEUE_HEADER = "x-sfsync-from-queue"
ROUTING_KEY_HEADER = "x-sfsync-routing-key"
# RabbitMQ's count of a quorum queue message's earlier deliveries that were not acked (a worker
# that died holding it, a requeue). With a delivery limit L, the delivery counted L is its last.
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass(frozen=True)
class QueueSpec:
    """One durable queue and what it is bound to; `dead_letter_to` names a queue."""

    name: str
    routing_keys: tuple[str, ...] = ()
    message_ttl_ms: int | None = None
    dead_letter_to: str | None = None
    # Quorum queues count redeliveries: a message that keeps killing its consumer is parked.
    delivery_limit: int | None = None
    # Temporary listener queues (the one-shot `sync` command) expire when nobody uses them.
    expires_ms: int | None = None
    quorum: bool = True


@dataclass(frozen=True)
class Topology:
    """Every name carries `prefix`, so several deployments (and test sessions) share one broker."""

    prefix: str = "sfsync"
    retry_delay_ms: int = 30_000
    delivery_limit: int = 20
    # Only an audit-enabled process declares the audit queues: a deployment without an audit role
    # must not collect every event in a queue that nobody reads.
    audit: bool = False

    @property
    def exchange(self) -> str:
        return self.prefix

    @property
    def sync_queue(self) -> str:
        return f"{self.prefix}.sync"

    @property
    def provisioning_queue(self) -> str:
        return f"{self.prefix}.provisioning"

    @property
    def audit_queue(self) -> str:
        return f"{self.prefix}.audit"

    @staticmethod
    def retry_queue(queue: str) -> str:
        return f"{queue}.retry"

    @staticmethod
    def dead_queue(queue: str) -> str:
        return f"{queue}.dead"

    def work_queue(self, name: str, routing_keys: tuple[str, ...]) -> list[QueueSpec]:
        """A work queue with its retry queue (TTL, then back to work) and its parking queue."""
        return [
            QueueSpec(
                name=name,
                routing_keys=routing_keys,
                dead_letter_to=self.dead_queue(name),
                delivery_limit=self.delivery_limit,
            ),
            QueueSpec(
                name=self.retry_queue(name),
                message_ttl_ms=self.retry_delay_ms,
                dead_letter_to=name,
            ),
            QueueSpec(name=self.dead_queue(name)),
        ]

    def queues(self) -> list[QueueSpec]:
        queues = self.work_queue(self.sync_queue, SYNC_KEYS) + self.work_queue(
            self.provisioning_queue, PROVISIONING_KEYS
        )
        if self.audit:
            queues += self.work_queue(self.audit_queue, AUDIT_KEYS)
        return queues

    def owns(self, queue: str) -> bool:
        """Whether `queue` is one of this deployment's: a work, retry or parking queue (the
        audit role's too), or a run's listener queue. Not merely a name that starts with the
        prefix: the prefix "acme" must not claim the queues of a deployment named "acme.eu"."""
        return queue.startswith(f"{self.prefix}.run.") or queue in self._own_queue_names

    @cached_property
    def _own_queue_names(self) -> frozenset[str]:
        return frozenset(spec.name for spec in Topology(self.prefix, audit=True).queues())

    def listener_queue(self, name: str, routing_keys: tuple[str, ...] = EVENT_KEYS) -> QueueSpec:
        """A queue for one listener of events; it disappears 10 minutes after it is last used."""
        return QueueSpec(
            name=f"{self.prefix}.{name}",
            routing_keys=routing_keys,
            expires_ms=600_000,
            quorum=False,
        )
