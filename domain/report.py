"""The per-customer sync report: counts per category and items, as JSON and as short text."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from domain.plan import Conflict, Pending, Plan, PlanItem, Skipped, Unmatched
from domain.policy import HoldReason


class Outcome(StrEnum):
    COMPLETED = "completed"
    HELD = "held"
    FAILED = "failed"


class SyncReport(BaseModel):
    """What one sync run decided for one customer (the payload of sync.completed/held/failed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    customer_id: str
    run_id: str
    outcome: Outcome
    dry_run: bool = False
    plan_id: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    sharefile_declared: int | None = None
    provision: tuple[PlanItem, ...] = ()
    deprovision: tuple[PlanItem, ...] = ()
    held: tuple[PlanItem, ...] = ()
    hold_reasons: tuple[HoldReason, ...] = ()
    approved: bool = False
    unmatched: tuple[Unmatched, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    pending: tuple[Pending, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    # The bulk provisioning requests this run published (none in a dry run).
    request_ids: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        customer_id: str,
        run_id: str,
        dry_run: bool,
        request_ids: tuple[str, ...] = (),
    ) -> SyncReport:
        return cls(
            customer_id=customer_id,
            run_id=run_id,
            outcome=Outcome.HELD if plan.is_held else Outcome.COMPLETED,
            dry_run=dry_run,
            plan_id=plan.plan_id,
            counts=plan.counts(),
            sharefile_declared=plan.sharefile_declared,
            provision=plan.provision,
            deprovision=plan.deprovision,
            held=plan.held,
            hold_reasons=plan.hold_reasons,
            approved=plan.approved,
            unmatched=plan.unmatched,
            conflicts=plan.conflicts,
            pending=plan.pending,
            skipped=plan.skipped,
            request_ids=request_ids,
        )

    @classmethod
    def failure(cls, *, customer_id: str, run_id: str, dry_run: bool, error: str) -> SyncReport:
        return cls(
            customer_id=customer_id,
            run_id=run_id,
            outcome=Outcome.FAILED,
            dry_run=dry_run,
            error=error,
        )


def render_text(report: SyncReport) -> str:
    """A few lines for a person: the outcome, the counts, and why anything was held or failed."""
    mode = " (dry run)" if report.dry_run else ""
    head = f"{report.customer_id}: {report.outcome.value}{mode}"
    if report.outcome is Outcome.FAILED:
        return f"{head}\n  error: {report.error}"
    c = report.counts
    lines = [
        head,
        (
            f"  provision {c.get('provision', 0)}, deprovision {c.get('deprovision', 0)}, "
            f"held {c.get('held', 0)}, in sync {c.get('in_sync', 0)}"
        ),
        (
            f"  unmatched {c.get('unmatched', 0)}, conflicts {c.get('conflicts', 0)}, "
            f"pending {c.get('pending', 0)}, skipped {c.get('skipped', 0)}"
        ),
    ]
    for reason in report.hold_reasons:
        lines.append(f"  held: {reason.message}")
    if report.hold_reasons and report.plan_id:
        lines.append(f"  to approve after review: sfsync approve {report.plan_id} --reason '...'")
    return "\n".join(lines)
