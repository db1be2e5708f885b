"""The audit store on SQLite and on PostgreSQL: migrations, idempotent inserts, queries."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from adapters.audit_store import (
    MIGRATIONS,
    V1_TABLES,
    AuditStore,
    Migration,
    create_audit_engine,
    latest_version,
)
from domain.audit import ApprovalRecord, Category
from domain.errors import ConfigError, TransientError
from domain.messages import (
    ProvisioningCompleted,
    ProvisioningFailed,
    ProvisioningItem,
    ProvisioningRequested,
    SyncCommand,
    SyncRequested,
    report_payload,
)
from domain.plan import Action, Conflict, PlanItem, Rule, Skipped, SkipReason, Unmatched
from domain.policy import HoldCode, HoldReason
from domain.records import ItemResult, SharefileState
from domain.report import Outcome, SyncReport
from tests.audit_db import database_url, postgres_schema_url, postgres_url  # noqa: F401
from tests.fakes import fixed_stamper

STAMP = fixed_stamper()


@pytest.fixture
def store(database_url: str) -> Iterator[AuditStore]:  # noqa: F811
    opened = AuditStore.open(database_url)
    yield opened
    opened.close()


def removal(user_id: str, email: str, rule: Rule = Rule.ABSENT_FROM_SHAREFILE) -> PlanItem:
    return PlanItem(
        action=Action.DEPROVISION,
        user_id=user_id,
        email=email,
        rule=rule,
        match_key=email.lower(),
        sm_state=SharefileState.PROVISIONED,
    )


def addition(user_id: str, email: str, sharefile_id: str) -> PlanItem:
    return PlanItem(
        action=Action.PROVISION,
        user_id=user_id,
        email=email,
        rule=Rule.EMPLOYEE_WITHOUT_SERVICE,
        match_key=email.lower(),
        sm_state=SharefileState.NOT_PROVISIONED,
        sharefile_user_id=sharefile_id,
    )


def completed(run_id: str = "run-1", customer_id: str = "cust-1", **fields: object):
    report = SyncReport(
        customer_id=customer_id,
        run_id=run_id,
        outcome=Outcome.COMPLETED,
        plan_id="plan-a",
        counts={"provision": 1, "deprovision": 1},
        provision=(addition("u-2", "Bob@Example.com", "sf-2"),),
        deprovision=(removal("u-1", "Alice@Example.com"),),
        request_ids=("req-1",),
        **fields,  # type: ignore[arg-type]
    )
    return STAMP(report_payload(report), correlation_id=run_id)


def held(run_id: str = "run-1", plan_id: str = "plan-h"):
    report = SyncReport(
        customer_id="cust-1",
        run_id=run_id,
        outcome=Outcome.HELD,
        plan_id=plan_id,
        counts={"held": 1},
        held=(removal("u-1", "alice@example.com"),),
        hold_reasons=(HoldReason(code=HoldCode.TOO_MANY_DEPROVISIONS, message="1 > 0"),),
    )
    return STAMP(report_payload(report), correlation_id=run_id)


def request(run_id: str = "run-1", request_id: str = "req-1"):
    items = (
        ProvisioningItem(
            user_id="u-2",
            action=Action.PROVISION,
            email="Bob@Example.com",
            rule=Rule(Rule.EMPLOYEE_WITHOUT_SERVICE),
        ),
        ProvisioningItem(
            user_id="u-1",
            action=Action.DEPROVISION,
            email="Alice@Example.com",
            rule=Rule.ABSENT_FROM_SHAREFILE,
        ),
    )
    payload = ProvisioningRequested(
        customer_id="cust-1", run_id=run_id, request_id=request_id, items=items
    )
    return STAMP(payload, correlation_id=run_id)


def answer(run_id: str = "run-1", request_id: str = "req-1"):
    payload = ProvisioningCompleted(
        customer_id="cust-1",
        run_id=run_id,
        request_id=request_id,
        items=(
            ItemResult(user_id="u-2", action="provision", status="accepted"),
            ItemResult(
                user_id="u-1",
                action="deprovision",
                status="rejected",
                error_code="already_in_state",
                error_message="user is not provisioned",
            ),
        ),
    )
    return STAMP(payload, correlation_id=run_id)


# -- migrations ----------------------------------------------------------------------------------


def test_migrations_from_empty_create_every_table_at_the_latest_version(database_url: str) -> None:  # noqa: F811
    store = AuditStore.open(database_url, migrate=False)
    try:
        assert store.version() == 0
        assert store.migrate() == [m.version for m in MIGRATIONS]
        assert store.version() == latest_version()
        names = set(sa.inspect(store.engine).get_table_names())
        assert {t.name for t in V1_TABLES} | {"schema_version"} <= names
    finally:
        store.close()


def test_applying_the_migrations_again_is_a_no_op_and_keeps_the_data(store: AuditStore) -> None:
    store.record(completed())
    before = store.table_counts()
    assert store.migrate() == []
    another = AuditStore.open(store.engine.url.render_as_string(hide_password=False))
    try:  # a second process starting up: already migrated
        assert another.migrate() == []
    finally:
        another.close()
    assert store.table_counts() == before
    assert store.version() == latest_version()


def test_a_new_step_is_applied_once_and_in_order(store: AuditStore) -> None:
    ran: list[int] = []

    def add_notes(connection: sa.Connection) -> None:
        ran.append(2)
        connection.execute(sa.text("CREATE TABLE IF NOT EXISTS audit_notes (note TEXT)"))

    def index_notes(connection: sa.Connection) -> None:
        ran.append(3)
        connection.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_notes ON audit_notes (note)"))

    steps = (
        *MIGRATIONS,
        Migration(3, "index notes", index_notes),
        Migration(2, "notes", add_notes),
    )
    assert store.migrate(steps) == [2, 3]
    assert store.migrate(steps) == []
    assert ran == [2, 3]
    assert store.version() == 3


def test_a_database_newer_than_this_code_is_refused(store: AuditStore) -> None:
    steps = (*MIGRATIONS, Migration(2, "from the future", lambda connection: None))
    store.migrate(steps)
    with pytest.raises(ConfigError, match="newer than this sfsync knows"):
        store.migrate()


def test_processes_migrating_at_once_apply_each_step_once(database_url: str) -> None:  # noqa: F811
    stores = [AuditStore.open(database_url, migrate=False) for _ in range(4)]
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def migrate(store: AuditStore) -> None:
        try:
            results.append(store.migrate())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(results) == [[], [], [], [1]]
    for store in stores:
        store.close()


def test_opening_a_new_sqlite_database_while_another_process_writes_to_it_waits(
    tmp_path: Path,
) -> None:
    # Switching to WAL needs the file to itself, and SQLite answers "locked" at once there rather
    # than waiting its busy timeout: several roles opening one new database together failed.
    path = tmp_path / "audit.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    released = threading.Timer(0.3, writer.execute, args=("COMMIT",))
    released.start()
    try:
        store = AuditStore.open(f"sqlite:///{path}")
    finally:
        released.join()
        writer.close()
    assert store.version() == latest_version(MIGRATIONS)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


# -- idempotent storage --------------------------------------------------------------------------


def test_a_redelivered_event_adds_no_rows(store: AuditStore) -> None:
    events = [completed(), request(), answer(), held(run_id="run-2")]
    assert all(store.record(event) for event in events)
    counts = store.table_counts()
    assert [store.record(event) for event in events] == [False] * 4
    assert store.table_counts() == counts
    assert counts["audit_events"] == 4 and counts["audit_report_items"] == 3


def test_a_request_published_again_under_a_new_message_id_keeps_its_items_once(
    store: AuditStore,
) -> None:
    assert store.record(request())
    assert store.record(request())  # same request_id: a redelivered sync command republishes it
    counts = store.table_counts()
    assert counts["audit_events"] == 2
    assert counts["audit_requests"] == 1 and counts["audit_request_items"] == 2


# -- queries -------------------------------------------------------------------------------------


def test_a_report_reads_back_with_its_counts_reasons_and_utc_time(store: AuditStore) -> None:
    event = held()
    store.record(event)
    [report] = store.reports(customer_id="cust-1")
    assert report.message_id == str(event.message_id)
    assert (report.outcome, report.plan_id, report.counts) == ("held", "plan-h", {"held": 1})
    assert report.hold_reasons[0].code is HoldCode.TOO_MANY_DEPROVISIONS
    assert report.occurred_at == event.occurred_at.astimezone(UTC)
    assert store.reports(customer_id="cust-2") == []


@pytest.mark.parametrize("spelling", ["u-1", "ALICE@example.COM", "  alice@example.com "])
def test_a_user_is_found_by_id_or_any_spelling_of_the_address(
    store: AuditStore, spelling: str
) -> None:
    store.record(completed())
    [item] = store.items_of_user("cust-1", spelling)
    assert (item.category, item.user_id, item.rule) == (
        Category.DEPROVISION,
        "u-1",
        "absent_from_sharefile",
    )
    assert item.sm_state == "provisioned" and item.match_key == "alice@example.com"


def test_a_user_is_found_by_sharefile_id_and_in_unmatched_and_conflict_lines(
    store: AuditStore,
) -> None:
    store.record(
        completed(
            unmatched=(
                Unmatched(
                    sharefile_user_id="sf-9", email="Zoe@Example.com", match_key="zoe@example.com"
                ),
            ),
            conflicts=(
                Conflict(
                    match_key="twin@example.com",
                    sm_user_ids=("u-7", "u-8"),
                    sharefile_user_ids=("sf-7",),
                ),
            ),
        )
    )
    assert [i.category for i in store.items_of_user("cust-1", "sf-2")] == [Category.PROVISION]
    assert [i.category for i in store.items_of_user("cust-1", "zoe@EXAMPLE.com")] == [
        Category.UNMATCHED
    ]
    assert [i.user_id for i in store.items_of_user("cust-1", "u-8")] == ["u-8"]
    assert len(store.items_of_user("cust-1", "twin@example.com")) == 3
    assert store.items_of_user("cust-1", "nobody@example.com") == []
    assert store.items_of_user("cust-2", "u-1") == []


def test_over_long_texts_are_cut_to_fit_and_the_event_is_kept(store: AuditStore) -> None:
    # Nothing bounds what Services Manager or ShareFile send; PostgreSQL would refuse the row
    # (and with it the whole report) where SQLite keeps it.
    email = "x" * 400 + "@Example.com"
    long_id = "u-" + "9" * 300
    report = SyncReport(
        customer_id="cust-1",
        run_id="run-1",
        outcome=Outcome.COMPLETED,
        plan_id="plan-a",
        counts={"deprovision": 1},
        deprovision=(removal(long_id, email),),
        skipped=(Skipped(reason=SkipReason.SM_USER_WITHOUT_EMAIL, user_id="u-3", email=" " * 600),),
    )
    assert store.record(STAMP(report_payload(report), correlation_id="run-1"))

    [item] = store.items_of_user("cust-1", email.upper())  # the full address still finds it
    assert item.user_id is not None and item.email is not None and item.match_key is not None
    assert (len(item.user_id), len(item.email), len(item.match_key)) == (256, 320, 320)
    assert item.email == email[:319] + "…" and item.user_id.endswith("…")
    assert [i.user_id for i in store.items_of_user("cust-1", long_id)] == [item.user_id]
    [full] = store.reports(customer_id="cust-1")
    assert full.counts == {"deprovision": 1}


def test_two_over_long_ids_cut_to_the_same_key_do_not_fail_the_answer(store: AuditStore) -> None:
    prefix = "u" * 300
    payload = ProvisioningCompleted(
        customer_id="cust-1",
        run_id="run-1",
        request_id="req-1",
        items=(
            ItemResult(user_id=prefix + "-A", action="provision", status="accepted"),
            ItemResult(user_id=prefix + "-B", action="provision", status="accepted"),
            ItemResult(user_id="u-2", action="provision", status="accepted"),
        ),
    )
    assert store.record(STAMP(payload, correlation_id="run-1"))
    answers = store.answers_for(["req-1"])
    assert sorted(len(a.user_id) for a in answers) == [3, 256]  # the first of the two is kept


def test_requested_items_carry_the_answer_of_services_manager(store: AuditStore) -> None:
    store.record(request())
    assert {i.status for i in store.requested_items()} == {"unanswered"}
    store.record(answer())
    rows = {(i.user_id, i.action): i for i in store.requested_items(customer_id="cust-1")}
    assert rows[("u-2", "provision")].status == "accepted"
    assert rows[("u-1", "deprovision")].status == "rejected"
    assert rows[("u-1", "deprovision")].error_code == "already_in_state"
    assert [i.user_id for i in store.requested_items()] == ["u-2", "u-1"]  # request order
    assert store.requested_items(run_id="run-other") == []
    assert store.answered_request_ids("run-1") == {"req-1"}


def test_an_item_answer_wins_over_a_failure_of_the_same_request(store: AuditStore) -> None:
    store.record(request())
    failure = ProvisioningFailed(
        customer_id="cust-1",
        run_id="run-1",
        request_id="req-1",
        error="503",
        items=request().payload.items,
    )
    store.record(STAMP(failure, correlation_id="run-1"))
    assert {i.status for i in store.requested_items()} == {"failed"}
    store.record(answer())
    assert {i.status for i in store.requested_items()} == {"accepted", "rejected"}


def test_commands_are_stored_with_their_approved_plan(store: AuditStore) -> None:
    command = SyncCommand(
        customer_id="cust-1", run_id="run-9", reason="manual", approved_plan_id="plan-h"
    )
    requested = SyncRequested(customer_id="cust-1", source="crm")
    assert store.record(STAMP(command, correlation_id="run-9"))
    assert store.record(STAMP(requested, correlation_id="request-crm"))
    assert store.table_counts()["audit_commands"] == 2
    assert store.approved_commands() == [("plan-h", "run-9")]


def test_approvals_are_recorded_and_can_be_withdrawn(store: AuditStore) -> None:
    approval = ApprovalRecord(
        plan_id="plan-h",
        customer_id="cust-1",
        run_id="run-2",
        command_message_id="m-1",
        approver="ops@example.com",
        reason="customer confirmed",
        approved_at=datetime(2026, 11, 27, 13, 0, tzinfo=UTC),
    )
    store.record_approval(approval)
    assert store.approvals(plan_id="plan-h") == [approval]
    store.forget_approval("m-1")
    assert store.approvals() == []


# -- configuration and failures ------------------------------------------------------------------


def test_an_unsupported_database_url_is_a_configuration_error_without_its_password() -> None:
    with pytest.raises(ConfigError) as error:
        create_audit_engine("mysql://admin:hunter2@db.example/audit")
    assert "hunter2" not in str(error.value) and "***" in str(error.value)


def test_an_unreachable_database_is_a_transient_error_without_its_password() -> None:
    store = AuditStore(
        create_audit_engine(
            "postgresql+psycopg://admin:hunter2@127.0.0.1:1/audit?connect_timeout=2"
        )
    )
    with pytest.raises(TransientError) as error:
        store.migrate()
    assert "hunter2" not in str(error.value)
    assert (
        store.redacted_url == "postgresql+psycopg://admin:***@127.0.0.1:1/audit?connect_timeout=2"
    )


def test_a_file_that_is_not_a_database_is_a_configuration_error(tmp_path: Path) -> None:
    # It was a 170-line traceback from every command that reads the audit trail.
    path = tmp_path / "audit.db"
    path.write_text("not a database, a note someone saved under this name\n")
    with pytest.raises(ConfigError, match="cannot be used as the audit database: file is not"):
        AuditStore.open(f"sqlite:///{path}")
