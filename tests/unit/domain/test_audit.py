"""Held plans' status and a run's last report, read from audit records (no database)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from domain.audit import (
    AnswerRecord,
    ApprovalRecord,
    HeldStatus,
    ReportRecord,
    best_answer,
    held_plans,
    one_per_plan,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def report(
    minute: int,
    outcome: str,
    plan_id: str | None,
    *,
    run: str | None = None,
    customer: str = "cust-1",
    approved: bool = False,
) -> ReportRecord:
    return ReportRecord(
        message_id=f"m-{customer}-{minute}",
        customer_id=customer,
        run_id=run or f"run-{minute}",
        outcome=outcome,
        dry_run=False,
        plan_id=plan_id,
        approved=approved,
        counts={"held": 3} if outcome == "held" else {},
        hold_reasons=(),
        error=None,
        occurred_at=T0 + timedelta(minutes=minute),
    )


def approval(plan_id: str, minute: int) -> ApprovalRecord:
    return ApprovalRecord(
        plan_id=plan_id,
        customer_id="cust-1",
        run_id=f"run-{minute}",
        command_message_id=f"cmd-{minute}",
        approver="ops",
        reason=None,
        approved_at=T0 + timedelta(minutes=minute),
    )


def status_of(plan_id: str, reports: list[ReportRecord], approvals=()) -> HeldStatus:
    [plan] = [p for p in held_plans(reports, approvals) if p.plan_id == plan_id]
    return plan.status


def test_a_plan_held_again_by_later_runs_is_one_open_plan_since_its_first_hold() -> None:
    plans = held_plans([report(1, "held", "p1"), report(2, "held", "p1")], [])
    assert [(p.plan_id, p.status, p.first_held_at, p.last_run_id) for p in plans] == [
        ("p1", HeldStatus.OPEN, T0 + timedelta(minutes=1), "run-2")
    ]
    assert plans[0].held_removals == 3


def test_an_approved_plan_waits_for_its_re_plan() -> None:
    assert status_of("p1", [report(1, "held", "p1")], [approval("p1", 2)]) is HeldStatus.APPROVED


def test_a_plan_sent_by_a_later_approved_run_is_released() -> None:
    reports = [report(1, "held", "p1"), report(3, "completed", "p1", approved=True)]
    assert status_of("p1", reports, [approval("p1", 2)]) is HeldStatus.RELEASED


def test_a_plan_whose_approved_removals_went_out_under_another_plan_id_is_released() -> None:
    # Its provisions went out with the hold: the re-plan of its removals alone has another id.
    replan = report(3, "completed", "p1-removals", run="run-2", approved=True)
    reports = [report(1, "held", "p1"), replan]
    assert status_of("p1", reports, [approval("p1", 2)]) is HeldStatus.RELEASED
    # Without the approval's run, another plan's release does not release this one.
    assert status_of("p1", reports) is HeldStatus.SUPERSEDED


def test_a_plan_released_by_a_command_that_carried_its_approval_is_released() -> None:
    # `sfsync sync --approve-plan p1` records no approval, only the command: its run's approved
    # re-plan (another id: a joiner was provisioned with it) released p1.
    replan = report(3, "completed", "p1-and-a-joiner", run="run-sync", approved=True)
    reports = [report(1, "held", "p1"), replan]
    assert status_of("p1", reports) is HeldStatus.SUPERSEDED
    [plan] = held_plans(reports, [], approved_commands=[("p1", "run-sync")])
    assert plan.status is HeldStatus.RELEASED


def test_a_held_plan_names_its_last_held_report() -> None:
    [plan] = held_plans([report(1, "held", "p1"), report(2, "held", "p1")], [])
    assert plan.held_report_id == "m-cust-1-2"


def test_a_refused_approval_leaves_the_old_plan_superseded_and_the_new_one_open() -> None:
    reports = [report(1, "held", "p1"), report(3, "held", "p2")]
    plans = {p.plan_id: p for p in held_plans(reports, [approval("p1", 2)])}
    assert plans["p1"].status is HeldStatus.SUPERSEDED
    assert plans["p1"].latest is not None and plans["p1"].latest.plan_id == "p2"
    assert plans["p2"].status is HeldStatus.OPEN


def test_a_failed_run_does_not_supersede_a_held_plan() -> None:
    reports = [report(1, "held", "p1"), report(2, "failed", None)]
    assert status_of("p1", reports) is HeldStatus.OPEN


def test_another_customers_runs_do_not_touch_a_plan() -> None:
    reports = [report(1, "held", "p1"), report(2, "completed", "px", customer="cust-2")]
    assert status_of("p1", reports) is HeldStatus.OPEN


def test_a_redelivered_command_that_planned_the_same_counts_once_and_its_last_report_wins() -> None:
    first = report(1, "completed", "p1", run="run-a")
    again = report(2, "completed", "p1", run="run-a")
    other = report(3, "completed", "p9", run="run-b")
    assert one_per_plan([other, again, first]) == [again, other]


def test_a_redelivered_command_that_planned_anew_keeps_both_plans_on_record() -> None:
    # The first handling's requests went out and changed Services Manager: the re-plan differs,
    # and the first plan (the one whose removals were sent) must not disappear behind it.
    sent = report(1, "completed", "p1", run="run-a")
    replanned = report(2, "completed", "p2", run="run-a")
    failed = report(3, "failed", None, run="run-a")
    failed_again = report(4, "failed", None, run="run-a")
    assert one_per_plan([failed_again, replanned, failed, sent]) == [sent, replanned, failed_again]


def test_a_dry_run_with_the_approval_releases_nothing() -> None:
    dry = dataclasses.replace(report(3, "completed", "p1", approved=True), dry_run=True)
    reports = [report(1, "held", "p1"), dry]
    assert status_of("p1", reports, [approval("p1", 2)]) is HeldStatus.APPROVED
    assert status_of("p1", [report(1, "held", "p1"), dry]) is HeldStatus.OPEN


def test_an_item_answer_beats_a_request_failure_whatever_the_order() -> None:
    def answer(status: str, minute: int) -> AnswerRecord:
        return AnswerRecord(
            "req", "u", "deprovision", status, None, None, T0 + timedelta(minutes=minute)
        )

    assert best_answer([answer("accepted", 1), answer("failed", 2)]).status == "accepted"  # type: ignore[union-attr]
    assert best_answer([]) is None
