"""The sync worker's handler: fetch both user sets, reconcile, and say what should change."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters import metrics
from domain.errors import InvalidMessage, PermanentError, SfsyncError
from domain.messages import (
    Envelope,
    Stamper,
    SyncCommand,
    SyncRequested,
    provisioning_requests,
    report_payload,
)
from domain.policy import Policy
from domain.ports import ServicesManagerPort, ShareFilePort
from domain.reconcile import reconcile
from domain.report import SyncReport

log = logging.getLogger("sfsync.worker")


@dataclass(frozen=True)
class _Job:
    customer_id: str
    run_id: str
    dry_run: bool
    approved_plan_id: str | None


def job_of(message: Envelope[Any]) -> _Job:
    """A sync.command, or a sync.requested from another system (its own run, keyed by the event
    id so that a redelivered event plans, and names its requests, exactly as the first time)."""
    payload = message.payload
    if isinstance(payload, SyncCommand):
        return _Job(payload.customer_id, payload.run_id, payload.dry_run, payload.approved_plan_id)
    if isinstance(payload, SyncRequested):
        return _Job(payload.customer_id, f"event-{message.message_id}", False, None)
    raise InvalidMessage(f"the sync queue does not take {message.type} messages")


@dataclass
class SyncHandler:
    sm: ServicesManagerPort
    sharefile: ShareFilePort
    policy: Policy
    stamp: Stamper

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        job = job_of(message)
        context = {"correlation_id": job.run_id, "customer_id": job.customer_id}
        customer = self.sm.get_customer(job.customer_id)
        if not customer.sharefile_enabled or not customer.subdomain:
            raise PermanentError(
                "ShareFile is not enabled for this customer in Services Manager",
                customer_id=job.customer_id,
            )
        policy = self.policy
        if job.approved_plan_id:
            policy = policy.model_copy(update={"approved_plan_id": job.approved_plan_id})
        # ShareFile's feed is read in full first (the guard judges it whole); Services Manager's
        # pages then stream through reconcile and are dropped as they go, so a customer with a
        # million users costs one side's records, not both.
        feed = self.sharefile.employees(customer)
        sharefile_users = list(feed)
        plan = reconcile(
            self.sm.list_users(job.customer_id),
            sharefile_users,
            policy,
            customer_id=job.customer_id,
            sharefile_declared=feed.declared_count,
        )
        requests = (
            []
            if job.dry_run
            else provisioning_requests(plan, customer_id=job.customer_id, run_id=job.run_id)
        )
        report = SyncReport.from_plan(
            plan,
            customer_id=job.customer_id,
            run_id=job.run_id,
            dry_run=job.dry_run,
            request_ids=tuple(r.request_id for r in requests),
        )
        counts = plan.counts()
        metrics.plan(
            provision=counts["provision"], deprovision=counts["deprovision"], held=counts["held"]
        )
        log.info(
            "planned %s: provision %d, deprovision %d, held %d, unmatched %d, conflicts %d",
            report.outcome.value,
            counts["provision"],
            counts["deprovision"],
            counts["held"],
            counts["unmatched"],
            counts["conflicts"],
            extra=context,
        )
        for reason in plan.hold_reasons:
            log.warning("removals held: %s (plan %s)", reason.message, plan.plan_id, extra=context)
        outputs: list[Envelope[Any]] = [self.stamp(r, correlation_id=job.run_id) for r in requests]
        outputs.append(self.stamp(report_payload(report), correlation_id=job.run_id))
        return outputs

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        try:
            job = job_of(message)
        except InvalidMessage:
            return []
        report = SyncReport.failure(
            customer_id=job.customer_id, run_id=job.run_id, dry_run=job.dry_run, error=str(error)
        )
        return [self.stamp(report_payload(report), correlation_id=job.run_id)]
