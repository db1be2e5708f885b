"""Reading the audit trail: `why`, `report`, `held`, and `approve` for held plans."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from consumers.run_tracker import RunResult
from domain.errors import SfsyncError
from domain.report import Outcome, SyncReport
from sfsync.cli._common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
    _audit_store,
    _errors_as_exit,
    _fail,
    _settings,
    _table_console,
    _when,
    broker_option,
)
from sfsync.cli.runs import SUMMARY_COLUMNS

if TYPE_CHECKING:
    from adapters.audit_store import AuditStore
    from domain.audit import Decision, HeldPlan


FORMATS = ("table", "json")

CSV_COLUMNS = (
    "customer",
    "run",
    "request_id",
    "user_id",
    "email",
    "action",
    "rule",
    "sm_status",
    "sm_error_code",
)

REPORT_COLUMNS = ("run", *SUMMARY_COLUMNS, "accepted", "rejected")


@click.command()
@click.option("--customer", required=True, metavar="ID")
@click.option(
    "--user",
    "user",
    required=True,
    metavar="EMAIL_OR_ID",
    help="SM user id, ShareFile id or e-mail",
)
@click.option("--format", "fmt", type=click.Choice(("text", "json")), default="text")
def why(customer: str, user: str, fmt: str) -> None:
    """Explain every decision about one user across runs, from the audit trail.

    Exits 1 when the audit trail has nothing about this user.
    """
    from domain.audit import Category, Decision, best_answer, one_per_plan

    settings = _settings()
    with _audit_store(settings, reading=True) as store, _errors_as_exit():
        assert store is not None
        items = store.items_of_user(customer, user)
        current = {r.message_id: r for r in one_per_plan(store.reports(customer_id=customer))}
        items = [i for i in items if i.report_message_id in current]
        if not items:
            _fail(
                f"nothing in the audit trail ({store.redacted_url}) about {user!r} of customer "
                f"{customer!r}: no report names this Services Manager id, ShareFile id or e-mail "
                "address (users already in sync are counted, not listed)",
                code=EXIT_RUN_FAILED,
            )
        run_ids = sorted({current[i.report_message_id].run_id for i in items})
        plan_ids = {current[i.report_message_id].plan_id for i in items}
        approvals = [a for a in store.approvals(customer_id=customer) if a.plan_id in plan_ids]
        decisions = []
        for item in items:
            report = current[item.report_message_id]
            request_id = None
            answer = None
            if item.category in (Category.PROVISION, Category.DEPROVISION) and item.user_id:
                request_id = store.request_ids_of_user(customer, run_ids, item.user_id).get(
                    (report.run_id, item.action or "")
                )
                if request_id is not None:
                    answer = best_answer(
                        [
                            a
                            for a in store.answers_for([request_id], item.user_id)
                            if a.action == item.action
                        ]
                    )
            decisions.append(
                Decision(
                    report=report,
                    item=item,
                    request_id=request_id,
                    answer=answer,
                    approvals=tuple(a for a in approvals if a.plan_id == report.plan_id),
                )
            )
    decisions.sort(key=lambda d: (d.report.occurred_at, d.report.message_id))
    if fmt == "json":
        click.echo(json.dumps([_decision_json(d) for d in decisions], indent=2))
        return
    runs = len({d.report.run_id for d in decisions})
    click.echo(f"{customer} / {user}: {len(decisions)} decisions in {runs} runs, oldest first")
    for decision in decisions:
        for line in _decision_lines(decision):
            click.echo(line)


def _decision_lines(decision: Decision) -> list[str]:
    from domain.audit import Category

    report, item = decision.report, decision.item
    mode = ", dry run" if report.dry_run else ""
    lines = [
        "",
        f"run {report.run_id} ({_when(report.occurred_at)}): sync.{report.outcome}{mode}, "
        f"plan {report.plan_id or '-'}" + (" (approved)" if report.approved else ""),
    ]
    if item.category in (Category.PROVISION, Category.DEPROVISION):
        decision_text = item.category.value
    elif item.category is Category.HELD:
        decision_text = f"held {item.action} (not sent: waiting for approval)"
    else:
        decision_text = f"{item.category.value} (reported only, nothing requested)"
    lines.append(f"  decision   {decision_text}")
    if item.rule:
        lines.append(f"  rule       {item.rule}")
    lines.append(
        f"  evidence   match key {item.match_key or '-'}; SM user {item.user_id or '-'}"
        f" (state {item.sm_state or '-'}, e-mail {item.email or '-'}); "
        f"ShareFile user {item.sharefile_user_id or '-'}"
    )
    if item.detail:
        lines.append(f"  detail     {item.detail}")
    if item.category is Category.HELD:
        for reason in report.hold_reasons:
            lines.append(f"  held       {reason.code}: {reason.message}")
        for approval in decision.approvals:
            why_text = f" (reason: {approval.reason})" if approval.reason else ""
            lines.append(
                f"  approved   by {approval.approver} at {_when(approval.approved_at)}{why_text}, "
                f"re-plan run {approval.run_id}"
            )
    if decision.request_id:
        lines.append(f"  request    {decision.request_id}")
        answer = decision.answer
        if answer is None:
            lines.append("  answer     none recorded yet")
        else:
            code = f" ({answer.error_code})" if answer.error_code else ""
            message = f": {answer.error_message}" if answer.error_message else ""
            lines.append(f"  answer     {answer.status}{code}{message}")
    elif item.category in (Category.PROVISION, Category.DEPROVISION) and not report.dry_run:
        lines.append("  request    none recorded")
    return lines


def _decision_json(decision: Decision) -> dict[str, Any]:
    report, item = decision.report, decision.item
    answer = decision.answer
    return {
        "run_id": report.run_id,
        "occurred_at": report.occurred_at.isoformat(),
        "outcome": report.outcome,
        "dry_run": report.dry_run,
        "plan_id": report.plan_id,
        "approved_plan": report.approved,
        "decision": item.category.value,
        "action": item.action,
        "rule": item.rule,
        "user_id": item.user_id,
        "email": item.email,
        "match_key": item.match_key,
        "sm_state": item.sm_state,
        "sharefile_user_id": item.sharefile_user_id,
        "detail": item.detail,
        "hold_reasons": (
            [r.model_dump(mode="json") for r in report.hold_reasons]
            if item.category.value == "held"
            else []
        ),
        "approvals": [
            {
                "approver": a.approver,
                "approved_at": a.approved_at.isoformat(),
                "reason": a.reason,
                "run_id": a.run_id,
            }
            for a in decision.approvals
        ],
        "request_id": decision.request_id,
        "answer": None
        if answer is None
        else {
            "status": answer.status,
            "error_code": answer.error_code,
            "error_message": answer.error_message,
        },
    }


@click.command("report")
@click.option("--customer", metavar="ID", help="only this customer")
@click.option("--run", "run_id", metavar="RUN_ID", help="only this run")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("table", "json", "csv")),
    default="table",
    show_default=True,
    help="table/json: runs and their counts; csv: every requested item (the billing list)",
)
@click.option(
    "--limit", type=int, default=20, show_default=True, help="table/json: newest runs; 0 = all"
)
def report_command(customer: str | None, run_id: str | None, fmt: str, limit: int) -> None:
    """List runs per customer with their counts, or (csv) every item requested from SM."""
    from domain.audit import ReportRecord, one_per_plan

    settings = _settings()
    with _audit_store(settings, reading=True) as store, _errors_as_exit():
        assert store is not None
        if fmt == "csv":
            _write_csv(store.requested_items(customer_id=customer, run_id=run_id))
            return
        rows = one_per_plan(store.reports(customer_id=customer, run_id=run_id))
        if limit > 0:
            newest = list(dict.fromkeys(r.run_id for r in reversed(rows)))[:limit]
            rows = [r for r in rows if r.run_id in set(newest)]
        answered: dict[tuple[str, str], dict[str, int]] = {}
        runs = {r.run_id for r in rows}
        for item in store.requested_items(customer_id=customer, run_id=run_id):
            if item.run_id in runs:
                tally = answered.setdefault((item.customer_id, item.run_id), {})
                tally[item.status] = tally.get(item.status, 0) + 1
    # A run planned twice (a redelivered command) has a row per plan; its answers go on the last.
    last_of_run = {(r.customer_id, r.run_id): r.message_id for r in rows}

    def answers_of(r: ReportRecord) -> dict[str, int]:
        if last_of_run[(r.customer_id, r.run_id)] != r.message_id:
            return {}
        return answered.get((r.customer_id, r.run_id), {})

    if fmt == "json":
        document = [
            {
                "occurred_at": r.occurred_at.isoformat(),
                "run_id": r.run_id,
                "customer_id": r.customer_id,
                "outcome": r.outcome,
                "dry_run": r.dry_run,
                "plan_id": r.plan_id,
                "approved": r.approved,
                "counts": r.counts,
                "hold_reasons": [h.model_dump(mode="json") for h in r.hold_reasons],
                "error": r.error,
                "answers": answers_of(r),
            }
            for r in rows
        ]
        click.echo(json.dumps(document, indent=2))
        return
    if not rows:
        click.echo(
            "no runs in the audit trail" + (" for these filters" if customer or run_id else "")
        )
        return
    table = Table(title="sync runs (audit trail), oldest first", title_justify="left")
    for column in REPORT_COLUMNS:
        table.add_column(
            column,
            justify="left" if column in REPORT_COLUMNS[:3] else "right",
            # Ids are copied into other commands: never shortened.
            min_width=max(len(r.run_id) for r in rows) if column == "run" else None,
        )
    for r in rows:
        tally = answers_of(r)
        table.add_row(
            r.run_id,
            r.customer_id,
            r.outcome + (" (dry run)" if r.dry_run else ""),
            *(str(r.counts.get(k, 0)) for k in REPORT_COLUMNS[3:10]),
            str(tally.get("accepted", 0)),
            str(tally.get("rejected", 0) + tally.get("failed", 0)),
        )
    _table_console().print(table)


def _write_csv(items: list[Any]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in items:
        writer.writerow(
            (
                item.customer_id,
                item.run_id,
                item.request_id,
                item.user_id,
                item.email or "",
                item.action,
                item.rule,
                item.status,
                item.error_code or "",
            )
        )


def _held_plans(store: AuditStore) -> list[HeldPlan]:
    from domain.audit import held_plans

    return held_plans(
        store.reports_of_customers_with_holds(), store.approvals(), store.approved_commands()
    )


@click.command()
@click.option("--customer", metavar="ID", help="only this customer")
@click.option(
    "--all", "show_all", is_flag=True, help="also approved, released and superseded plans"
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def held(customer: str | None, show_all: bool, fmt: str) -> None:
    """List held plans waiting for an operator (approve one with `sfsync approve PLAN_ID`)."""
    from domain.audit import HeldStatus

    settings = _settings()
    with _audit_store(settings, reading=True) as store, _errors_as_exit():
        assert store is not None
        plans = _held_plans(store)
    plans = [
        p
        for p in plans
        if (customer is None or p.customer_id == customer)
        and (show_all or p.status is HeldStatus.OPEN)
    ]
    if fmt == "json":
        document = [
            {
                "customer_id": p.customer_id,
                "run_id": p.last_run_id,
                "plan_id": p.plan_id,
                "status": p.status.value,
                "held_since": p.first_held_at.isoformat(),
                "held_removals": p.held_removals,
                "hold_reasons": [r.model_dump(mode="json") for r in p.hold_reasons],
                "approvals": [
                    {"approver": a.approver, "approved_at": a.approved_at.isoformat()}
                    for a in p.approvals
                ],
            }
            for p in plans
        ]
        click.echo(json.dumps(document, indent=2))
        return
    if not plans:
        click.echo("no held plans waiting for approval" if not show_all else "no held plans")
        return
    table = Table(title="held plans", title_justify="left")
    widths = {
        "run": max(len(p.last_run_id) for p in plans),
        "plan": max(len(p.plan_id) for p in plans),
        "held since": len(_when(plans[0].first_held_at)),
    }
    for column in ("customer", "run", "plan", "reasons", "held removals", "held since") + (
        ("status",) if show_all else ()
    ):
        # Ids are copied into `sfsync approve`: never shortened.
        table.add_column(
            column,
            justify="right" if column == "held removals" else "left",
            min_width=widths.get(column),
        )
    for p in plans:
        table.add_row(
            p.customer_id,
            p.last_run_id,
            p.plan_id,
            "\n".join(r.message for r in p.hold_reasons),
            str(p.held_removals),
            _when(p.first_held_at),
            *((p.status.value,) if show_all else ()),
        )
    _table_console().print(table)
    if not show_all:
        click.echo("approve one after checking it: sfsync approve PLAN_ID [--reason TEXT]")


@click.command()
@broker_option
@click.argument("plan_id")
@click.option("--reason", help="why it is right to release these removals (recorded)")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="wait for the re-plan's report (always waits with memory://)",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="seconds to wait for it",
)
def approve(
    broker_url: str | None, plan_id: str, reason: str | None, wait: bool, timeout: float
) -> None:
    """Release the held removals of PLAN_ID: records who approved, then asks for a re-plan.

    The worker plans the customer again and sends the removals only if the new plan's removals
    are exactly the held ones; provisions (those of the held run went out with it) do not count.
    If a removal changed since, the new plan stays held: this command then says so (exit 1) and
    `sfsync held` lists the new plan.
    """
    import getpass

    from adapters.broker import Outgoing
    from domain.audit import ApprovalRecord, Category, HeldStatus
    from domain.messages import SyncCommand
    from domain.plan import plan_id_of
    from sfsync.audit import running_with_audit, wait_until_recorded
    from sfsync.bootstrap import new_run_id, track_run, utc_now

    settings = _settings(broker_url=broker_url)
    with _audit_store(settings) as store:
        assert store is not None
        with _errors_as_exit():
            plan = next((p for p in _held_plans(store) if p.plan_id == plan_id), None)
        if plan is None:
            _fail(
                f"{plan_id} is not a held plan in the audit trail ({store.redacted_url}); "
                "`sfsync held` lists the plans waiting for approval"
            )
        if plan.status is HeldStatus.RELEASED:
            _fail(f"{plan_id} of {plan.customer_id} was already released; nothing to approve")
        if plan.status is HeldStatus.SUPERSEDED:
            latest = plan.latest
            newer = (
                f"plan {latest.plan_id} ({latest.outcome}, run {latest.run_id})"
                if latest
                else "a newer plan"
            )
            _fail(
                f"{plan_id} of {plan.customer_id} was superseded by {newer}: the customer changed "
                "since it was held; review the new plan (`sfsync held`)"
            )
        approver = settings.approver or getpass.getuser()
        run_id = new_run_id()
        # The approval names the held removals alone: the plan's provisions went out with the
        # hold, so the re-plan has only the removals, and their id (domain.plan.removals_id).
        held = [
            (item.action or "", item.user_id or "", item.rule or "", item.sharefile_user_id)
            for item in store.items_of_report(plan.held_report_id)
            if item.category is Category.HELD
        ]
        command = SyncCommand(
            customer_id=plan.customer_id,
            run_id=run_id,
            reason="manual",
            approved_plan_id=plan_id_of(plan.customer_id, held) if held else plan_id,
        )
        local = settings.uses_memory_broker  # nobody else consumes an in-process broker
        with (
            _errors_as_exit(),
            running_with_audit(
                settings,
                store=store if local else None,
                worker=local,
                submitter=local,
                name="sfsync-approve",
            ) as roles,
        ):
            tracker, listener = track_run(roles, settings, run_id)
            try:
                tracker.expect([plan.customer_id])
                message = roles.stamp(command, correlation_id=run_id)
                store.record_approval(
                    ApprovalRecord(
                        plan_id=plan_id,
                        customer_id=plan.customer_id,
                        run_id=run_id,
                        command_message_id=str(message.message_id),
                        approver=approver,
                        reason=reason,
                        approved_at=utc_now(),
                    )
                )
                try:
                    roles.broker.publish([Outgoing.of(message)])
                except SfsyncError:
                    store.forget_approval(str(message.message_id))
                    raise
                click.echo(
                    f"approved {plan_id} of {plan.customer_id} as {approver}; "
                    f"re-plan requested (run {run_id})"
                )
                if not (wait or local):
                    click.echo(
                        "a worker plans the customer again: the removals go out only if they are "
                        "still exactly the held ones; otherwise it stays held (see `sfsync held`)"
                    )
                    return
                finished = tracker.wait(timeout)
                if finished and local:
                    wait_until_recorded(store, tracker.result)
            finally:
                listener.stop()
        if not finished:
            _fail(
                f"no report for run {run_id} within {timeout:.0f}s (is a worker running?); the "
                f"approval is recorded and the command queued: `sfsync report --run {run_id}` "
                "shows the outcome once it arrives",
                code=EXIT_TIMEOUT,
            )
        sys.exit(_explain_replan(plan_id, tracker.result.reports[plan.customer_id], tracker.result))


def _explain_replan(plan_id: str, report: SyncReport, result: RunResult) -> int:
    """Say what the re-plan did with the approval; the exit code follows."""
    if report.outcome is Outcome.FAILED:
        click.echo(f"the re-plan failed: {report.error}")
        return EXIT_RUN_FAILED
    if report.outcome is Outcome.HELD:
        if report.plan_id == plan_id:
            click.echo(f"refused: {plan_id} is still held")
        else:
            reasons = "; ".join(r.message for r in report.hold_reasons)
            click.echo(
                f"refused: {report.customer_id} changed since {plan_id} was held; the new plan "
                f"{report.plan_id} is held ({reasons}). Review it (`sfsync held`, `sfsync why`) "
                f"and approve {report.plan_id} if it is right."
            )
        return EXIT_RUN_FAILED
    from domain.records import ItemResult

    statuses: dict[str, int] = {}
    for request_id in report.request_ids:
        answer = result.answers.get(request_id)
        if answer is None:
            continue
        for item in answer.items:
            status = item.status if isinstance(item, ItemResult) else "failed"
            statuses[status] = statuses.get(status, 0) + 1
    answered = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no answer yet"
    counts = report.counts
    if report.approved and report.plan_id != plan_id:
        click.echo(
            f"released: the {counts.get('deprovision', 0)} removals of {plan_id} requested as "
            f"plan {report.plan_id} (the same removals, other provisions: "
            f"{counts.get('provision', 0)}); Services Manager: {answered}"
        )
    elif report.approved:
        click.echo(
            f"released: {counts.get('deprovision', 0)} removals and "
            f"{counts.get('provision', 0)} provisions of {plan_id} requested; "
            f"Services Manager: {answered}"
        )
    else:
        click.echo(
            f"{report.customer_id} changed since {plan_id} was held: the new plan "
            f"{report.plan_id} needed no approval and went out as usual "
            f"({counts.get('deprovision', 0)} removals; Services Manager: {answered})"
        )
    return EXIT_RUN_FAILED if result.failed_requests else EXIT_OK
