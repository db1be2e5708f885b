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
from domain.plan import Plan, Rule
from domain.policy import Policy
from domain.ports import EmployeeFeed, ServicesManagerPort, ShareFilePort
from domain.reconcile import reconcile
from domain.records import Customer, SharefileUser
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
        if feed.pages > 1 and any(i.rule is Rule.ABSENT_FROM_SHAREFILE for i in plan.deprovision):
            plan = self._confirmed_absences(plan, customer, job, policy, sharefile_users, feed)
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

    def _confirmed_absences(
        self,
        plan: Plan,
        customer: Customer,
        job: _Job,
        policy: Policy,
        first_read: list[SharefileUser],
        feed: EmployeeFeed,
    ) -> Plan:
        """The plan again if a second read of the feed lists users the first one did not.

        Pages read while the account changes can miss an employee: one removed before a page
        boundary moves the next one onto a page already read, and one added later keeps the
        count right. A removal as absent would then delete an active employee's account. So
        when a paged feed plans one, the feed is read again, and whoever either read lists is
        taken as present; the plan is made again only if that adds someone.
        """
        known = {user.id for user in first_read}
        # The client leaves the known users out without building their records: most of a
        # second read's cost for a big account, where nearly every user is known.
        again = [
            user for user in self.sharefile.employees(customer, known=known) if user.id not in known
        ]
        if not again:
            return plan
        log.warning(
            "a second read of the ShareFile feed listed %d users the first did not (the account "
            "changed while it was read); planning again with both reads",
            len(again),
            extra={"correlation_id": job.run_id, "customer_id": job.customer_id},
        )
        return reconcile(
            self.sm.list_users(job.customer_id),
            first_read + again,
            policy,
            customer_id=job.customer_id,
            sharefile_declared=feed.declared_count,
        )

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        try:
            job = job_of(message)
        except InvalidMessage:
            return []
        report = SyncReport.failure(
            customer_id=job.customer_id, run_id=job.run_id, dry_run=job.dry_run, error=str(error)
        )
        return [self.stamp(report_payload(report), correlation_id=job.run_id)]
