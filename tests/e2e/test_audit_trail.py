"""The audit trail end to end: a cycle on the simulators stored by the audit role, then the
operator's commands (`why`, `report`, `held`, `approve`) on what it stored."""

from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from adapters.audit_store import AuditStore
from domain.messages import envelope, report_payload
from domain.report import SyncReport
from sfsync.cli import EXIT_CONFIG, EXIT_RUN_FAILED, main
from sfsync.oneshot import RunTimeout, sync_once
from sfsync.settings import load_settings
from simulators import DEMO_SCENARIO_PATH, Scenario, load_scenario
from tests.e2e.conftest import settings_env
from tests.fakes import FakeServicesManager, FakeShareFile, employee, fixed_stamper
from tests.fakes import sm_user as fake_sm_user

HELD_CUSTOMER = "cust-0007"  # the demo's customer whose removals the guard holds


def cli(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def audit_env(sims: Any, tmp_path: Path, **extra: str) -> dict[str, str]:
    return settings_env(
        sims, tmp_path, SFSYNC_DATABASE_URL=f"sqlite:///{tmp_path / 'audit.db'}", **extra
    )


def run_cycle(env: dict[str, str]) -> dict[str, Any]:
    result = cli("sync", "--json", env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_why_explains_a_removal_with_its_rule_evidence_and_the_answer(
    start_fleet, tmp_path: Path
) -> None:
    sims = start_fleet()
    env = audit_env(sims, tmp_path)
    document = run_cycle(env)
    report, removal = next(
        (r, item) for r in document["reports"] for item in r["deprovision"] if item["email"]
    )

    # Any spelling of the address finds the user.
    text = cli(
        "why", "--customer", report["customer_id"], "--user", removal["email"].upper(), env=env
    )
    assert text.exit_code == 0, text.output
    assert f"rule       {removal['rule']}" in text.stdout
    assert f"SM user {removal['user_id']} (state provisioned" in text.stdout
    assert "answer     accepted" in text.stdout

    shown = cli(
        "why",
        "--customer",
        report["customer_id"],
        "--user",
        removal["user_id"],
        "--format",
        "json",
        env=env,
    )
    [decision] = json.loads(shown.stdout)
    assert decision["decision"] == "deprovision"
    assert decision["rule"] == removal["rule"]
    assert decision["run_id"] == document["run_id"]
    assert decision["request_id"] in report["request_ids"]
    assert decision["answer"] == {"status": "accepted", "error_code": None, "error_message": None}

    nobody = cli(
        "why", "--customer", report["customer_id"], "--user", "nobody@nowhere.example", env=env
    )
    assert nobody.exit_code == EXIT_RUN_FAILED
    assert "nothing in the audit trail" in nobody.output


def test_the_csv_report_lists_exactly_the_items_submitted_to_services_manager(
    start_fleet, tmp_path: Path
) -> None:
    sims = start_fleet()
    env = audit_env(sims, tmp_path)
    document = run_cycle(env)

    result = cli("report", "--format", "csv", env=env)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    listed = [(r["customer"], r["request_id"], r["user_id"], r["action"]) for r in rows]
    submitted = {
        (s["customer_id"], s["request_id"], item["user_id"], item["action"])
        for s in sims.submissions()
        if not s["replayed"]
        for item in s["items"]
    }
    assert listed and sorted(listed) == sorted(submitted)  # each item once, none missing
    answers = {
        (a["request_id"], i["user_id"]): i["status"]
        for a in document["requests"]
        for i in a["items"]
    }
    assert {r["sm_status"] for r in rows} <= {"accepted", "rejected"}
    assert all(answers[(r["request_id"], r["user_id"])] == r["sm_status"] for r in rows)
    assert {r["run"] for r in rows} == {document["run_id"]}

    table = cli("report", "--run", document["run_id"], "--format", "json", env=env)
    runs = json.loads(table.stdout)
    assert len(runs) == len(document["reports"])


def test_a_held_plan_is_listed_and_approving_it_releases_exactly_its_removals(
    start_fleet, tmp_path: Path
) -> None:
    sims = start_fleet(load_scenario(DEMO_SCENARIO_PATH))
    env = audit_env(sims, tmp_path, SFSYNC_APPROVER="ops@example.com")
    document = run_cycle(env)
    [held_report] = [r for r in document["reports"] if r["outcome"] == "held"]
    customer, plan_id = held_report["customer_id"], held_report["plan_id"]
    removals = {item["user_id"] for item in held_report["held"]}

    listed = json.loads(cli("held", "--format", "json", env=env).stdout)
    assert [(p["customer_id"], p["plan_id"], p["held_removals"]) for p in listed] == [
        (customer, plan_id, len(removals))
    ]
    assert plan_id in cli("held", env=env).stdout

    unknown = cli("approve", "plan-0000", env=env)
    assert unknown.exit_code == EXIT_CONFIG
    assert "plan-0000 is not a held plan" in unknown.output

    before = sims.sm_states()[customer]
    approved = cli("approve", plan_id, "--reason", "customer moved to another tenant", env=env)
    assert approved.exit_code == 0, approved.output
    assert f"released: {len(removals)} removals" in approved.stdout
    after = sims.sm_states()[customer]
    assert {u for u in after if after[u] != before[u]} == removals
    assert all(after[u] == "not_provisioned" for u in removals)

    assert "no held plans waiting" in cli("held", env=env).stdout
    statuses = json.loads(cli("held", "--all", "--format", "json", env=env).stdout)
    assert [(p["plan_id"], p["status"]) for p in statuses] == [(plan_id, "released")]
    store = AuditStore.open(env["SFSYNC_DATABASE_URL"])
    try:
        [approval] = store.approvals(plan_id=plan_id)
    finally:
        store.close()
    assert (approval.approver, approval.reason) == (
        "ops@example.com",
        "customer moved to another tenant",
    )

    user = sorted(removals)[0]
    why = cli("why", "--customer", customer, "--user", user, env=env).stdout
    assert "held deprovision" in why and "approved   by ops@example.com" in why
    assert why.index("held deprovision") < why.index("answer     accepted")


def demo_with_a_joiner_at_the_held_customer() -> Scenario:
    """The demo, where the customer whose removals are held also has an employee to provision."""
    document = json.loads(DEMO_SCENARIO_PATH.read_text(encoding="utf-8"))
    document["expected"] = None
    held = next(c for c in document["customers"] if c["id"] == HELD_CUSTOMER)
    user, employee = held["sm_users"][0], held["sharefile_employees"][0]
    held["sm_users"].append(
        {
            **user,
            "id": "u-000799",
            "username": "joiner@umbrella.example",
            "email": "Joiner@Umbrella.example",
            "sharefile": {**user["sharefile"], "state": "not_provisioned"},
        }
    )
    held["sharefile_employees"].append(
        {
            **employee,
            "Id": "00000007-3c1d-4e2f-9a5b-000000000799",
            "Email": "joiner@umbrella.example",
        }
    )
    return Scenario.model_validate(document)


def test_approving_a_held_plan_whose_provisions_went_out_with_the_hold_releases_it_at_once(
    start_fleet, tmp_path: Path
) -> None:
    # The held run sent the provision, so the re-plan holds only the removals: another plan id.
    # The approval names those removals, and is not refused for the provision that went out.
    sims = start_fleet(demo_with_a_joiner_at_the_held_customer())
    env = audit_env(sims, tmp_path)
    document = run_cycle(env)
    [held_report] = [r for r in document["reports"] if r["outcome"] == "held"]
    assert held_report["customer_id"] == HELD_CUSTOMER
    assert [i["user_id"] for i in held_report["provision"]] == ["u-000799"]
    plan_id = held_report["plan_id"]
    removals = {item["user_id"] for item in held_report["held"]}
    assert sims.sm_states()[HELD_CUSTOMER]["u-000799"] == "provisioned"

    approved = cli("approve", plan_id, env=env)

    assert approved.exit_code == 0, approved.output
    assert f"released: the {len(removals)} removals of {plan_id} requested as plan plan-" in (
        approved.stdout
    )
    assert "(the same removals, other provisions: 0)" in approved.stdout
    after = sims.sm_states()[HELD_CUSTOMER]
    assert {u for u, state in after.items() if state == "not_provisioned"} == removals
    statuses = json.loads(cli("held", "--all", "--format", "json", env=env).stdout)
    assert [(p["plan_id"], p["status"]) for p in statuses] == [(plan_id, "released")]


def test_an_approval_of_a_plan_that_no_longer_matches_is_refused_and_says_so(
    start_fleet, tmp_path: Path
) -> None:
    sims = start_fleet(load_scenario(DEMO_SCENARIO_PATH))
    env = audit_env(sims, tmp_path)
    document = run_cycle(env)
    [held_report] = [r for r in document["reports"] if r["outcome"] == "held"]
    customer, real_plan = held_report["customer_id"], held_report["plan_id"]
    # An operator looked at a plan from a state that has changed since: one removal fewer.
    stale = SyncReport.model_validate(
        {
            **held_report,
            "plan_id": "plan-stale",
            "run_id": "run-stale",
            "held": held_report["held"][1:],
        }
    )
    store = AuditStore.open(env["SFSYNC_DATABASE_URL"])
    try:
        store.record(
            envelope(
                report_payload(stale),
                message_id=uuid.uuid4(),
                occurred_at=datetime.now(UTC),  # after the first cycle, before the re-plan
                correlation_id="run-stale",
            )
        )
    finally:
        store.close()

    superseded = cli("approve", real_plan, env=env)
    assert superseded.exit_code == EXIT_CONFIG
    assert "superseded by plan plan-stale" in superseded.output

    before = sims.sm_states()[customer]
    refused = cli("approve", "plan-stale", env=env)
    assert refused.exit_code == EXIT_RUN_FAILED, refused.output
    assert f"refused: {customer} changed since plan-stale was held" in refused.stdout
    assert f"the new plan {real_plan} is held" in refused.stdout
    assert sims.sm_states()[customer] == before
    open_plans = json.loads(cli("held", "--format", "json", env=env).stdout)
    assert [p["plan_id"] for p in open_plans] == [real_plan]


def test_the_demo_stores_its_run_and_says_how_to_ask_why(tmp_path: Path) -> None:
    env = {"SFSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}"}
    demo = cli("demo", "--json", env=env)
    assert demo.exit_code == 0, demo.output
    hint = next(line for line in demo.stderr.splitlines() if line.startswith("audit trail in"))
    assert "sqlite:///" in hint
    command = hint.split("try: ", 1)[1].split(" (also", 1)[0].split()
    assert command[:2] == ["sfsync", "why"]
    why = cli(*command[1:], env=env)
    assert why.exit_code == 0, why.output
    assert "decision" in why.stdout and "rule" in why.stdout


class SlowSubmitServicesManager(FakeServicesManager):
    """Takes its time to answer the bulk POST: the run's deadline passes meanwhile."""

    def submit(self, customer_id: str, request_id: str, items: Any) -> Any:
        time.sleep(2.0)
        return super().submit(customer_id, request_id, items)


def test_a_request_answered_after_the_runs_deadline_still_has_its_answer_in_the_audit_trail(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # On memory://, the audit consumer used to stop first: the in-process submitter still
    # finished the request in its hands, Services Manager applied it, and its answer went to a
    # queue nobody read, so `sfsync why` said "no answer recorded" for a change that was made.
    for name in [n for n in os.environ if n.startswith("SFSYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    sm, sharefile = SlowSubmitServicesManager(), FakeShareFile()
    sm.add_customer("cust-1", [fake_sm_user("u1", "a@x.example")])
    sharefile.set_employees("cust-1", [employee("s1", "a@x.example")])
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        with pytest.raises(RunTimeout) as timed_out:
            sync_once(
                load_settings(broker_url="memory://"),
                timeout_s=0.5,
                overrides={"sm": sm, "sharefile": sharefile, "stamp": fixed_stamper()},
                audit=store,
            )
        run_id = timed_out.value.result.run_id
        [(_, request_id, _)] = sm.submitted  # Services Manager did provision u1
        assert store.answered_request_ids(run_id) == {request_id}
    finally:
        store.close()
