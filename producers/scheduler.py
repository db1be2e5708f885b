"""The scheduler: one sync.command per enabled customer, published in confirmed batches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from adapters.broker import Broker, Outgoing
from domain.errors import TransientError
from domain.messages import Stamper, SyncCommand, SyncRequested, envelope
from domain.ports import ServicesManagerPort

log = logging.getLogger("sfsync.scheduler")

# Confirms are awaited once per batch, not once per message: 10,000 commands in seconds.
PUBLISH_BATCH = 1000
PUBLISH_ATTEMPTS = 5
PUBLISH_MAX_WAIT_S = 10.0


@dataclass(frozen=True)
class ScheduledRun:
    run_id: str
    customer_ids: tuple[str, ...]


@dataclass
class Scheduler:
    sm: ServicesManagerPort
    broker: Broker
    stamp: Stamper
    new_run_id: Callable[[], str]

    def run_once(
        self,
        *,
        customer_ids: Sequence[str] | None = None,
        dry_run: bool = False,
        approved_plan_id: str | None = None,
        reason: Literal["scheduled", "event", "manual"] = "scheduled",
        run_id: str | None = None,
        on_listed: Callable[[tuple[str, ...]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> ScheduledRun:
        """Publish one command per customer (all enabled ones unless `customer_ids` is given).

        Once `stop` is set, no further page of customers is read and no further batch is
        published: the run ends with what was published so far (a SIGTERM must not wait for
        a listing of thousands of customers, nor publish them all)."""
        run_id = run_id or self.new_run_id()
        stopping = stop.is_set if stop is not None else (lambda: False)
        if customer_ids:
            ids = tuple(dict.fromkeys(customer_ids))
        else:
            listed: list[str] = []
            for customer in self.sm.list_customers():
                if stopping():
                    log.warning("run %s: stopping while listing customers", run_id)
                    return ScheduledRun(run_id=run_id, customer_ids=())
                listed.append(customer.id)
            # A listing whose pages shifted may name a customer twice: one command each.
            ids = tuple(dict.fromkeys(listed))
        if on_listed is not None:
            on_listed(ids)
        log.info(
            "run %s: publishing %d sync commands",
            run_id,
            len(ids),
            extra={"correlation_id": run_id},
        )
        commands = [
            SyncCommand(
                customer_id=customer_id,
                run_id=run_id,
                reason=reason,
                dry_run=dry_run,
                approved_plan_id=approved_plan_id,
            )
            for customer_id in ids
        ]
        for start in range(0, len(commands), PUBLISH_BATCH):
            if stopping():
                log.warning(
                    "run %s: stopping after %d of %d commands", run_id, start, len(commands)
                )
                return ScheduledRun(run_id=run_id, customer_ids=ids[:start])
            batch = [
                Outgoing.of(self.stamp(command, correlation_id=run_id))
                for command in commands[start : start + PUBLISH_BATCH]
            ]
            self._publish(batch)
            done = min(start + PUBLISH_BATCH, len(commands))
            if len(commands) > PUBLISH_BATCH:
                log.info("run %s: %d/%d commands confirmed", run_id, done, len(commands))
        return ScheduledRun(run_id=run_id, customer_ids=ids)

    def run_every(self, interval_s: float, stop: threading.Event, **options: object) -> None:
        """Start a run every `interval_s` seconds until `stop` is set; a failed run is logged
        and the next one still starts."""
        while not stop.is_set():
            try:
                self.run_once(stop=stop, **options)  # type: ignore[arg-type]
            except TransientError as exc:
                log.error("scheduled run failed, next one in %.0fs: %s", interval_s, exc)
            except Exception:
                # Services Manager refusing our token, a malformed page, a bug: the schedule
                # itself must go on (the process would otherwise live on, scheduling nothing).
                log.exception("scheduled run failed, next one in %.0fs", interval_s)
            stop.wait(interval_s)

    def _publish(self, batch: list[Outgoing]) -> None:
        # A retried batch may publish some commands twice: the worker's handling is idempotent.
        for attempt in Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(PUBLISH_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.5, max=PUBLISH_MAX_WAIT_S),
            reraise=True,
        ):
            with attempt:
                self.broker.publish(batch)


def request_sync(
    broker: Broker, stamp: Stamper, *, customer_id: str, source: str, reason: str | None = None
) -> str:
    """What another system does to ask for one customer's sync: publish a sync.requested event.
    Returns its message id."""
    # The run it starts is `event-<message_id>` (consumers/sync_worker.py): so is its correlation.
    message_id = stamp.new_id()
    message = envelope(
        SyncRequested(customer_id=customer_id, source=source, reason=reason),
        message_id=message_id,
        occurred_at=stamp.clock(),
        correlation_id=f"event-{message_id}",
    )
    broker.publish([Outgoing.of(message)])
    return str(message.message_id)
