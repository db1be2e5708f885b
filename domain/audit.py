"""What the audit trail's records mean: one user's decisions across runs, and held plans' status."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from domain.policy import HoldReason


class Category(StrEnum):
    """Where a user appears in a report: an action, a hold, or only a mention."""

    PROVISION = "provision"
    DEPROVISION = "deprovision"
    HELD = "held"
    PENDING = "pending"
    SKIPPED = "skipped"
    UNMATCHED = "unmatched"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class ReportRecord:
    """One stored sync.completed / sync.held / sync.failed event."""

    message_id: str
    customer_id: str
    run_id: str
    outcome: str
    dry_run: bool
    plan_id: str | None
    approved: bool
    counts: dict[str, int]
    hold_reasons: tuple[HoldReason, ...]
    error: str | None
    occurred_at: datetime


@dataclass(frozen=True)
class ItemRecord:
    """One user's line in one report, with the evidence the worker had."""

    report_message_id: str
    category: Category
    user_id: str | None
    email: str | None
    action: str | None = None
    rule: str | None = None
    match_key: str | None = None
    sm_state: str | None = None
    sharefile_user_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class AnswerRecord:
    """Services Manager's answer for one item of one request (or the request's failure)."""

    request_id: str
    user_id: str
    action: str
    status: str  # accepted | rejected | failed
    error_code: str | None
    error_message: str | None
    occurred_at: datetime


@dataclass(frozen=True)
class RequestedItem:
    """One item of a published bulk request and what Services Manager answered (if it has)."""

    customer_id: str
    run_id: str
    request_id: str
    user_id: str
    email: str | None
    action: str
    rule: str
    requested_at: datetime
    status: str  # accepted | rejected | failed | unanswered
    error_code: str | None = None


@dataclass(frozen=True)
class ApprovalRecord:
    plan_id: str
    customer_id: str
    run_id: str
    command_message_id: str
    approver: str
    reason: str | None
    approved_at: datetime


class HeldStatus(StrEnum):
    OPEN = "open"  # waiting for an operator
    APPROVED = "approved"  # approved; the re-plan has not been reported yet
    RELEASED = "released"  # a later run sent exactly this plan's removals
    SUPERSEDED = "superseded"  # the customer's latest plan is another one (also: approval refused)


@dataclass(frozen=True)
class HeldPlan:
    plan_id: str
    customer_id: str
    first_held_at: datetime
    last_run_id: str
    hold_reasons: tuple[HoldReason, ...]
    held_removals: int
    status: HeldStatus
    # The message id of its last `sync.held` report (its held items are that report's).
    held_report_id: str = ""
    approvals: tuple[ApprovalRecord, ...] = ()
    # The customer's latest plan report, when it is another plan (what superseded this one).
    latest: ReportRecord | None = None


def one_per_plan(reports: Iterable[ReportRecord]) -> list[ReportRecord]:
    """The reports that say something new, oldest first: one per customer, run and plan.

    A redelivered command reports again. If it planned the same, its report repeats the first one
    (the last one is kept). If it planned differently, its first handling's requests had usually
    changed Services Manager already: both plans were decided, and both are kept, so that a
    removal sent by the first stays on record. A failed handling (no plan) counts once per run.
    """
    chosen: dict[tuple[str, str, str | None], ReportRecord] = {}
    for report in sorted(reports, key=_report_order):
        chosen.pop((report.customer_id, report.run_id, report.plan_id), None)
        chosen[(report.customer_id, report.run_id, report.plan_id)] = report
    return list(chosen.values())


def held_plans(
    reports: Iterable[ReportRecord],
    approvals: Iterable[ApprovalRecord],
    approved_commands: Iterable[tuple[str, str]] = (),
) -> list[HeldPlan]:
    """Every plan that was ever held, with its status now, oldest first.

    Only reports with a plan count (a failed run says nothing about the plan); the customer's
    latest such report decides whether a held plan was superseded. `approved_commands` are the
    (approved plan id, run id) of commands that carried an approval without a recorded one
    (`sfsync sync --approve-plan`): their runs may release the plan too.
    """
    command_runs: dict[str, set[str]] = {}
    for approved_plan_id, run_id in approved_commands:
        command_runs.setdefault(approved_plan_id, set()).add(run_id)
    planned = [r for r in one_per_plan(reports) if r.plan_id is not None]
    by_plan: dict[str, list[ApprovalRecord]] = {}
    for approval in sorted(approvals, key=lambda a: a.approved_at):
        by_plan.setdefault(approval.plan_id, []).append(approval)
    latest: dict[str, ReportRecord] = {}
    for report in planned:
        latest[report.customer_id] = report
    holds: dict[str, list[ReportRecord]] = {}
    for report in planned:
        if report.outcome == "held":
            assert report.plan_id is not None
            holds.setdefault(report.plan_id, []).append(report)
    result = []
    for plan_id, held in holds.items():
        first, last = held[0], held[-1]
        newest = latest[first.customer_id]
        plan_approvals = tuple(by_plan.get(plan_id, ()))
        approval_runs = {a.run_id for a in plan_approvals} | command_runs.get(plan_id, set())
        # Released by a run that sent its removals on an approval: the plan itself, or the
        # re-plan its approval asked for (without the provisions that went out with the hold).
        # A dry run with the approval only showed what it would send: it released nothing.
        released = any(
            (r.plan_id == plan_id or r.run_id in approval_runs)
            and r.approved
            and not r.dry_run
            and r.outcome != "held"
            for r in planned
            if r.customer_id == first.customer_id
        )
        if released:
            status = HeldStatus.RELEASED
        elif newest.plan_id != plan_id:
            status = HeldStatus.SUPERSEDED
        elif plan_approvals:
            status = HeldStatus.APPROVED
        else:
            status = HeldStatus.OPEN
        result.append(
            HeldPlan(
                plan_id=plan_id,
                customer_id=first.customer_id,
                first_held_at=first.occurred_at,
                last_run_id=last.run_id,
                hold_reasons=last.hold_reasons,
                held_removals=last.counts.get("held", 0),
                status=status,
                held_report_id=last.message_id,
                approvals=plan_approvals,
                latest=newest if newest.plan_id != plan_id else None,
            )
        )
    return sorted(result, key=lambda h: (h.first_held_at, h.plan_id))


@dataclass(frozen=True)
class Decision:
    """What one run decided about one user, and what became of it."""

    report: ReportRecord
    item: ItemRecord
    request_id: str | None = None
    answer: AnswerRecord | None = None
    approvals: tuple[ApprovalRecord, ...] = ()


@dataclass
class UserChain:
    """A user's decisions across runs, oldest first."""

    customer_id: str
    query: str
    decisions: list[Decision] = field(default_factory=list)


def best_answer(answers: Sequence[AnswerRecord]) -> AnswerRecord | None:
    """Services Manager's item answer wins over a request failure; the latest answer otherwise."""
    if not answers:
        return None
    ranked = sorted(answers, key=lambda a: (a.status != "failed", a.occurred_at))
    return ranked[-1]


def _report_order(report: ReportRecord) -> tuple[datetime, str]:
    return (report.occurred_at, report.message_id)
