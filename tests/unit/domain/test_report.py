"""The per-customer sync report: counts from the plan, JSON round trip, text for a person."""

from __future__ import annotations

from domain.plan import Plan
from domain.policy import HoldCode, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import SharefileState, SharefileUser, SmUser
from domain.report import Outcome, SyncReport, render_text

PROVISIONED = SharefileState.PROVISIONED
NOT_PROVISIONED = SharefileState.NOT_PROVISIONED


STRICT = SafetyGuard(max_deprovision=0)


def one_of_everything(policy: Policy | None = None) -> Plan:
    """A plan with exactly one item in each category, and one user in sync."""
    sm_users = [
        SmUser(id="u-1", state=NOT_PROVISIONED, email="new@acme.example"),
        SmUser(id="u-2", state=PROVISIONED, email="gone@acme.example"),
        SmUser(id="u-3", state=PROVISIONED, email="kept@acme.example"),
        SmUser(id="u-4", state=NOT_PROVISIONED, email="dup@acme.example"),
        SmUser(id="u-5", state=NOT_PROVISIONED, email="Dup@acme.example"),
        SmUser(id="u-6", state=SharefileState.PROVISIONING, email="fly@acme.example"),
        SmUser(id="u-7", state=PROVISIONED, email=None),
    ]
    employees = [
        SharefileUser(id="sf-1", email="new@acme.example"),
        SharefileUser(id="sf-3", email="kept@acme.example"),
        SharefileUser(id="sf-4", email="dup@acme.example"),
        SharefileUser(id="sf-6", email="fly@acme.example"),
        SharefileUser(id="sf-8", email="lonely@acme.example", first_name="Lo"),
    ]
    return reconcile(sm_users, employees, policy, customer_id="cust-1", sharefile_declared=5)


def report_of(plan: Plan, *, dry_run: bool = False) -> SyncReport:
    return SyncReport.from_plan(
        plan, customer_id="cust-1", run_id="run-1", dry_run=dry_run, request_ids=("req-a",)
    )


def test_report_counts_every_category_of_the_plan() -> None:
    report = report_of(one_of_everything())

    assert report.outcome is Outcome.COMPLETED
    assert report.counts == {
        "sm_users": 7,
        "sharefile_employees": 5,
        "provisioned_before": 3,
        "provision": 1,
        "deprovision": 1,
        "held": 0,
        "unmatched": 1,
        "conflicts": 1,
        "pending": 1,
        "skipped": 1,
        "in_sync": 1,
    }


def test_report_carries_the_plan_items_and_ids() -> None:
    plan = one_of_everything()
    report = report_of(plan)

    assert report.plan_id == plan.plan_id
    assert report.provision == plan.provision
    assert report.deprovision == plan.deprovision
    assert report.unmatched == plan.unmatched
    assert report.conflicts == plan.conflicts
    assert report.pending == plan.pending
    assert report.skipped == plan.skipped
    assert report.sharefile_declared == 5
    assert report.request_ids == ("req-a",)
    assert report.error is None


def test_report_of_a_held_plan_is_held_and_counts_the_held_items() -> None:
    report = report_of(one_of_everything(Policy(guard=STRICT)))

    assert report.outcome is Outcome.HELD
    assert report.counts["held"] == 1
    assert report.counts["deprovision"] == 0
    assert [r.code for r in report.hold_reasons] == [HoldCode.TOO_MANY_DEPROVISIONS]


def test_report_of_an_approved_plan_is_completed() -> None:
    held = one_of_everything(Policy(guard=STRICT))

    plan = one_of_everything(Policy(guard=STRICT, approved_plan_id=held.plan_id))
    report = report_of(plan)

    assert report.outcome is Outcome.COMPLETED
    assert report.approved is True
    assert report.counts["deprovision"] == 1
    assert report.counts["held"] == 0
    assert report.hold_reasons == ()


def test_report_survives_a_json_round_trip() -> None:
    for report in (
        report_of(one_of_everything()),
        report_of(one_of_everything(Policy(guard=STRICT)), dry_run=True),
        SyncReport.failure(customer_id="cust-1", run_id="run-1", dry_run=False, error="timeout"),
    ):
        assert SyncReport.model_validate_json(report.model_dump_json()) == report


def test_failure_report_has_no_plan_and_says_what_failed() -> None:
    report = SyncReport.failure(
        customer_id="cust-1", run_id="run-1", dry_run=False, error="ShareFile HTTP 503"
    )

    assert report.outcome is Outcome.FAILED
    assert report.plan_id is None
    assert report.counts == {}
    assert report.error == "ShareFile HTTP 503"


def test_text_of_a_completed_sync_names_the_outcome_and_the_counts() -> None:
    text = render_text(report_of(one_of_everything()))

    assert text.splitlines()[0] == "cust-1: completed"
    assert "provision 1, deprovision 1, held 0, in sync 1" in text
    assert "unmatched 1, conflicts 1, pending 1, skipped 1" in text
    assert "to approve" not in text


def test_text_of_a_dry_run_says_so() -> None:
    text = render_text(report_of(one_of_everything(), dry_run=True))

    assert text.splitlines()[0] == "cust-1: completed (dry run)"


def test_text_of_a_held_sync_gives_the_reasons_and_how_to_approve() -> None:
    plan = one_of_everything(Policy(guard=STRICT))
    text = render_text(report_of(plan))

    assert text.splitlines()[0] == "cust-1: held"
    assert "held 1" in text
    assert f"held: {plan.hold_reasons[0].message}" in text
    assert "max_deprovision=0" in text
    assert f"sfsync approve {plan.plan_id}" in text


def test_text_of_a_failed_sync_gives_the_error() -> None:
    report = SyncReport.failure(
        customer_id="cust-1", run_id="run-1", dry_run=False, error="ShareFile HTTP 503"
    )

    assert render_text(report) == "cust-1: failed\n  error: ShareFile HTTP 503"
