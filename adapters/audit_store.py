"""The audit trail's database (SQLAlchemy Core): schema, ordered migrations, inserts and queries.

SQLite by default, PostgreSQL with a `postgresql+psycopg://` URL. The schema is versioned by a
`schema_version` table: `migrate()` applies, in order and each in its own locked transaction,
every step the database has not seen yet; re-running it is a no-op. Every stored event is keyed
by its `message_id`, so a redelivered event adds nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
)
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from domain.audit import (
    AnswerRecord,
    ApprovalRecord,
    Category,
    ItemRecord,
    ReportRecord,
    RequestedItem,
    best_answer,
)
from domain.errors import ConfigError, TransientError
from domain.matching import normalise_email
from domain.messages import (
    Envelope,
    ProvisioningCompleted,
    ProvisioningFailed,
    ProvisioningRequested,
    SyncCommand,
    SyncRequested,
)
from domain.policy import HoldReason
from domain.report import SyncReport

log = logging.getLogger("sfsync.audit.store")

SUPPORTED_DIALECTS = ("sqlite", "postgresql")
# Any constant works: it only has to be the same in every process migrating one database.
_PG_MIGRATION_LOCK = 0x5F5_A0D1
SQLITE_BUSY_TIMEOUT_S = 30.0


def redact_database_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


# -- schema --------------------------------------------------------------------------------------
# The Table objects describe the latest schema version and are what queries use. Shipped migration
# steps never change: a new column or table is a new step below, and these definitions follow it.


class _Bounded(sa.TypeDecorator[str]):
    """VARCHAR(n) that cuts a longer text to fit, marked with "…", where SQLite would keep it and
    PostgreSQL would refuse the row, and with it the whole event: one odd e-mail address must not
    lose a run's report from the audit trail (the event's full text stays in audit_events.body).
    Query parameters compared with such a column are cut the same way, so they still match."""

    impl = sa.String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        if value is not None and len(value) > self.length:
            return value[: self.length - 1] + "…"
        return value


metadata = sa.MetaData()
_ID = _Bounded(128)
_WHEN = sa.DateTime(timezone=True)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", _Bounded(200), nullable=False),
    sa.Column("applied_at", _WHEN, nullable=False),
)

# Every event as it arrived: the idempotency key and the raw evidence behind every other row.
events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("message_id", _Bounded(64), primary_key=True),
    sa.Column("type", _Bounded(64), nullable=False),
    sa.Column("correlation_id", _ID, nullable=False),
    sa.Column("customer_id", _ID),
    sa.Column("occurred_at", _WHEN, nullable=False),
    sa.Column("stored_at", _WHEN, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_audit_events_correlation", "correlation_id"),
)

commands = sa.Table(
    "audit_commands",
    metadata,
    sa.Column("message_id", _Bounded(64), sa.ForeignKey(events.c.message_id), primary_key=True),
    sa.Column("type", _Bounded(64), nullable=False),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("reason", _Bounded(500)),
    sa.Column("source", _Bounded(200)),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("approved_plan_id", _ID),
    sa.Column("occurred_at", _WHEN, nullable=False),
    sa.Index("ix_audit_commands_customer", "customer_id", "occurred_at"),
)

reports = sa.Table(
    "audit_reports",
    metadata,
    sa.Column("message_id", _Bounded(64), sa.ForeignKey(events.c.message_id), primary_key=True),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("outcome", _Bounded(16), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("plan_id", _ID),
    sa.Column("approved", sa.Boolean, nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("hold_reasons", sa.JSON, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("occurred_at", _WHEN, nullable=False),
    sa.Index("ix_audit_reports_customer", "customer_id", "occurred_at"),
    sa.Index("ix_audit_reports_run", "run_id"),
    sa.Index("ix_audit_reports_plan", "plan_id"),
)

report_items = sa.Table(
    "audit_report_items",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "report_message_id",
        _Bounded(64),
        sa.ForeignKey(reports.c.message_id),
        nullable=False,
    ),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("category", _Bounded(16), nullable=False),
    sa.Column("action", _Bounded(16)),
    sa.Column("user_id", _Bounded(256)),
    sa.Column("email", _Bounded(320)),
    # normalise_email(email): `why` finds a user by any spelling of the address.
    sa.Column("email_key", _Bounded(320)),
    sa.Column("rule", _Bounded(64)),
    sa.Column("match_key", _Bounded(320)),
    sa.Column("sm_state", _Bounded(32)),
    sa.Column("sharefile_user_id", _Bounded(256)),
    sa.Column("detail", _Bounded(500)),
    sa.Index("ix_audit_items_user", "customer_id", "user_id"),
    sa.Index("ix_audit_items_email", "customer_id", "email_key"),
    sa.Index("ix_audit_items_match", "customer_id", "match_key"),
    sa.Index("ix_audit_items_sharefile", "customer_id", "sharefile_user_id"),
    sa.Index("ix_audit_items_report", "report_message_id"),
)

# A request is published again when its sync command is redelivered: keyed by request_id.
requests = sa.Table(
    "audit_requests",
    metadata,
    sa.Column("request_id", _ID, primary_key=True),
    sa.Column("message_id", _Bounded(64), sa.ForeignKey(events.c.message_id), nullable=False),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("parts", sa.Integer, nullable=False),
    sa.Column("occurred_at", _WHEN, nullable=False),
    sa.Index("ix_audit_requests_run", "customer_id", "run_id"),
)

request_items = sa.Table(
    "audit_request_items",
    metadata,
    sa.Column("request_id", _ID, sa.ForeignKey(requests.c.request_id), primary_key=True),
    sa.Column("user_id", _Bounded(256), primary_key=True),
    sa.Column("action", _Bounded(16), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("email", _Bounded(320)),
    sa.Column("rule", _Bounded(64), nullable=False),
)

answers = sa.Table(
    "audit_answers",
    metadata,
    sa.Column("message_id", _Bounded(64), sa.ForeignKey(events.c.message_id), primary_key=True),
    sa.Column("request_id", _ID, nullable=False),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("outcome", _Bounded(16), nullable=False),  # completed | failed
    sa.Column("replayed", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("occurred_at", _WHEN, nullable=False),
    sa.Index("ix_audit_answers_request", "request_id"),
)

answer_items = sa.Table(
    "audit_answer_items",
    metadata,
    sa.Column(
        "answer_message_id", _Bounded(64), sa.ForeignKey(answers.c.message_id), primary_key=True
    ),
    sa.Column("user_id", _Bounded(256), primary_key=True),
    sa.Column("action", _Bounded(16), primary_key=True),
    sa.Column("request_id", _ID, nullable=False),
    sa.Column("status", _Bounded(16), nullable=False),  # accepted | rejected | failed
    sa.Column("error_code", _Bounded(128)),
    sa.Column("error_message", sa.Text),
    sa.Index("ix_audit_answer_items_request", "request_id", "user_id"),
)

# Written by `sfsync approve` (who and why), linked to the sync.command it published.
approvals = sa.Table(
    "audit_approvals",
    metadata,
    sa.Column("command_message_id", _Bounded(64), primary_key=True),
    sa.Column("plan_id", _ID, nullable=False),
    sa.Column("customer_id", _ID, nullable=False),
    sa.Column("run_id", _ID, nullable=False),
    sa.Column("approver", _Bounded(200), nullable=False),
    sa.Column("reason", _Bounded(1000)),
    sa.Column("approved_at", _WHEN, nullable=False),
    sa.Index("ix_audit_approvals_plan", "plan_id"),
)

V1_TABLES = (
    events,
    commands,
    reports,
    report_items,
    requests,
    request_items,
    answers,
    answer_items,
    approvals,
)


# -- migrations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One schema step. `apply` must be idempotent (checkfirst / IF NOT EXISTS): a step that was
    half-applied outside a transaction by hand must still complete."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_initial(connection: Connection) -> None:
    metadata.create_all(connection, tables=list(V1_TABLES), checkfirst=True)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events, commands, reports and items, requests, answers, approvals", _v1_initial),
)


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return max((m.version for m in migrations), default=0)


# -- the store -----------------------------------------------------------------------------------


def create_audit_engine(url: str) -> Engine:
    """An engine for SQLite or PostgreSQL; any other URL is a ConfigError (password redacted)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("SFSYNC_DATABASE_URL: not a database URL") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise ConfigError(
            f"SFSYNC_DATABASE_URL: {redact_database_url(url)} is not SQLite or PostgreSQL "
            "(use sqlite:///PATH or postgresql+psycopg://…)"
        )
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(
                parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, poolclass=sa.NullPool
            )
            _serialise_sqlite_writers(engine)
        else:
            engine = sa.create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"SFSYNC_DATABASE_URL: no driver for {parsed.drivername}: {exc}"
        ) from None
    return engine


def _serialise_sqlite_writers(engine: Engine) -> None:
    """pysqlite starts transactions lazily and in DEFERRED mode, so two processes could both read
    the schema version and both migrate. BEGIN IMMEDIATE takes the write lock up front."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        try:
            _use_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """WAL, so that `sfsync why` reads while the audit role writes. The mode is stored in the
    file, but switching it needs the database to itself, and SQLite answers "database is locked"
    at once there instead of waiting the busy timeout: processes opening a new database together
    (several audit roles starting) retry within that same timeout."""
    for attempt in Retrying(
        retry=retry_if_exception(_sqlite_locked),
        wait=wait_random_exponential(multiplier=0.01, max=0.25),
        stop=stop_after_delay(SQLITE_BUSY_TIMEOUT_S),
        reraise=True,
    ):
        with attempt:
            cursor.execute("PRAGMA journal_mode=WAL")


def _sqlite_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


class AuditStore:
    """Insert and query the audit trail. Connection problems raise TransientError."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> AuditStore:
        store = cls(create_audit_engine(url))
        if migrate:
            store.migrate()
        return store

    @property
    def redacted_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- migrations --

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
        """Apply the steps this database lacks, in order; return their versions ([] if none)."""
        applied: list[int] = []
        for step in sorted(migrations, key=lambda m: m.version):
            with self._begin() as connection:
                self._lock_for_migration(connection)
                current = self._version(connection)
                newest = latest_version(migrations)
                if current > newest:
                    raise ConfigError(
                        f"the audit database ({self.redacted_url}) has schema version {current}, "
                        f"newer than this sfsync knows ({newest}): upgrade sfsync"
                    )
                if step.version <= current:
                    continue
                log.info(
                    "audit database: applying migration %d (%s)", step.version, step.description
                )
                step.apply(connection)
                connection.execute(
                    schema_version.insert().values(
                        version=step.version, description=step.description, applied_at=_now()
                    )
                )
                applied.append(step.version)
        return applied

    def version(self) -> int:
        with self._begin() as connection:
            return self._version(connection)

    @staticmethod
    def _version(connection: Connection) -> int:
        schema_version.create(connection, checkfirst=True)
        value = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        return int(value or 0)

    @staticmethod
    def _lock_for_migration(connection: Connection) -> None:
        # Two processes starting at once: the second waits, then finds nothing left to apply.
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))

    # -- writes --

    def record(self, message: Envelope[Any], *, stored_at: datetime | None = None) -> bool:
        """Store one event and what it says; False if this message_id was stored already."""
        payload = message.payload
        customer_id = getattr(payload, "customer_id", None)
        occurred_at = _utc(message.occurred_at)
        with self._begin() as connection:
            inserted = _insert_ignoring_duplicates(
                connection,
                events,
                {
                    "message_id": str(message.message_id),
                    "type": message.type,
                    "correlation_id": message.correlation_id,
                    "customer_id": customer_id,
                    "occurred_at": occurred_at,
                    "stored_at": stored_at or _now(),
                    "body": message.model_dump_json(),
                },
                ["message_id"],
            )
            if not inserted:
                return False
            message_id = str(message.message_id)
            if isinstance(payload, SyncReport):
                self._record_report(connection, message_id, payload, occurred_at)
            elif isinstance(payload, ProvisioningRequested):
                self._record_request(connection, message_id, payload, occurred_at)
            elif isinstance(payload, ProvisioningCompleted | ProvisioningFailed):
                self._record_answer(connection, message_id, payload, occurred_at)
            elif isinstance(payload, SyncCommand | SyncRequested):
                self._record_command(connection, message, payload, occurred_at)
            return True

    def record_approval(self, approval: ApprovalRecord) -> None:
        with self._begin() as connection:
            connection.execute(
                approvals.insert().values(
                    command_message_id=approval.command_message_id,
                    plan_id=approval.plan_id,
                    customer_id=approval.customer_id,
                    run_id=approval.run_id,
                    approver=approval.approver,
                    reason=approval.reason,
                    approved_at=_utc(approval.approved_at),
                )
            )

    def forget_approval(self, command_message_id: str) -> None:
        """Undo record_approval when its command could not be published."""
        with self._begin() as connection:
            connection.execute(
                approvals.delete().where(approvals.c.command_message_id == command_message_id)
            )

    @staticmethod
    def _record_report(
        connection: Connection, message_id: str, report: SyncReport, occurred_at: datetime
    ) -> None:
        connection.execute(
            reports.insert().values(
                message_id=message_id,
                customer_id=report.customer_id,
                run_id=report.run_id,
                outcome=report.outcome.value,
                dry_run=report.dry_run,
                plan_id=report.plan_id,
                approved=report.approved,
                counts=dict(report.counts),
                hold_reasons=[r.model_dump(mode="json") for r in report.hold_reasons],
                error=report.error,
                occurred_at=occurred_at,
            )
        )
        rows = [
            {"report_message_id": message_id, "customer_id": report.customer_id, **row}
            | {"run_id": report.run_id}
            for row in _item_rows(report)
        ]
        if rows:
            connection.execute(report_items.insert(), rows)

    @staticmethod
    def _record_request(
        connection: Connection,
        message_id: str,
        request: ProvisioningRequested,
        occurred_at: datetime,
    ) -> None:
        new = _insert_ignoring_duplicates(
            connection,
            requests,
            {
                "request_id": request.request_id,
                "message_id": message_id,
                "customer_id": request.customer_id,
                "run_id": request.run_id,
                "part": request.part,
                "parts": request.parts,
                "occurred_at": occurred_at,
            },
            ["request_id"],
        )
        if new:
            connection.execute(
                request_items.insert(),
                [
                    {
                        "request_id": request.request_id,
                        "user_id": item.user_id,
                        "action": item.action.value,
                        "position": position,
                        "email": item.email,
                        "rule": item.rule.value,
                    }
                    for position, item in enumerate(request.items)
                ],
            )

    @staticmethod
    def _record_answer(
        connection: Connection,
        message_id: str,
        answer: ProvisioningCompleted | ProvisioningFailed,
        occurred_at: datetime,
    ) -> None:
        failed = isinstance(answer, ProvisioningFailed)
        connection.execute(
            answers.insert().values(
                message_id=message_id,
                request_id=answer.request_id,
                customer_id=answer.customer_id,
                run_id=answer.run_id,
                outcome="failed" if failed else "completed",
                replayed=getattr(answer, "replayed", False),
                error=answer.error if isinstance(answer, ProvisioningFailed) else None,
                occurred_at=occurred_at,
            )
        )
        rows: list[dict[str, Any]]
        if isinstance(answer, ProvisioningFailed):
            rows = [
                {
                    "user_id": i.user_id,
                    "action": i.action.value,
                    "status": "failed",
                    "error_code": None,
                    "error_message": None,
                }
                for i in answer.items
            ]
        else:
            rows = [
                {
                    "user_id": i.user_id,
                    "action": i.action,
                    "status": i.status,
                    "error_code": i.error_code,
                    "error_message": i.error_message,
                }
                for i in answer.items
            ]
        # One answer lists each (user, action) once; a malformed repeat must not fail the event.
        unique = {(r["user_id"], r["action"]): r for r in rows}
        if unique:
            # Ids longer than the column are cut to fit (_Bounded): two that differ only past
            # that point would then share a key, and must not fail the whole event.
            connection.execute(
                _insert_or_ignore(
                    connection, answer_items, ["answer_message_id", "user_id", "action"]
                ),
                [
                    {**r, "answer_message_id": message_id, "request_id": answer.request_id}
                    for r in unique.values()
                ],
            )

    @staticmethod
    def _record_command(
        connection: Connection,
        message: Envelope[Any],
        payload: SyncCommand | SyncRequested,
        occurred_at: datetime,
    ) -> None:
        if isinstance(payload, SyncCommand):
            row = {
                "run_id": payload.run_id,
                "reason": payload.reason,
                "source": None,
                "dry_run": payload.dry_run,
                "approved_plan_id": payload.approved_plan_id,
            }
        else:
            # The worker treats it as a command with this run id (see consumers/sync_worker.py).
            row = {
                "run_id": f"event-{message.message_id}",
                "reason": payload.reason,
                "source": payload.source,
                "dry_run": False,
                "approved_plan_id": None,
            }
        connection.execute(
            commands.insert().values(
                message_id=str(message.message_id),
                type=message.type,
                customer_id=payload.customer_id,
                occurred_at=occurred_at,
                **row,
            )
        )

    # -- queries --

    def reports(
        self,
        *,
        customer_id: str | None = None,
        run_id: str | None = None,
        plan_id: str | None = None,
        outcome: str | None = None,
    ) -> list[ReportRecord]:
        """Stored reports, oldest first (redelivered duplicates included)."""
        query = sa.select(reports).order_by(reports.c.occurred_at, reports.c.message_id)
        if customer_id is not None:
            query = query.where(reports.c.customer_id == customer_id)
        if run_id is not None:
            query = query.where(reports.c.run_id == run_id)
        if plan_id is not None:
            query = query.where(reports.c.plan_id == plan_id)
        if outcome is not None:
            query = query.where(reports.c.outcome == outcome)
        with self._read() as connection:
            return [_report_record(row) for row in connection.execute(query).mappings()]

    def reports_of_customers_with_holds(self) -> list[ReportRecord]:
        """Every report of every customer that ever had a held plan (held-plan status needs the
        customer's later reports too)."""
        held_customers = (
            sa.select(reports.c.customer_id).where(reports.c.outcome == "held").distinct()
        )
        query = (
            sa.select(reports)
            .where(reports.c.customer_id.in_(held_customers))
            .order_by(reports.c.occurred_at, reports.c.message_id)
        )
        with self._read() as connection:
            return [_report_record(row) for row in connection.execute(query).mappings()]

    def approvals(
        self, *, plan_id: str | None = None, customer_id: str | None = None
    ) -> list[ApprovalRecord]:
        query = sa.select(approvals).order_by(approvals.c.approved_at)
        if plan_id is not None:
            query = query.where(approvals.c.plan_id == plan_id)
        if customer_id is not None:
            query = query.where(approvals.c.customer_id == customer_id)
        with self._read() as connection:
            return [
                ApprovalRecord(
                    plan_id=row["plan_id"],
                    customer_id=row["customer_id"],
                    run_id=row["run_id"],
                    command_message_id=row["command_message_id"],
                    approver=row["approver"],
                    reason=row["reason"],
                    approved_at=_utc(row["approved_at"]),
                )
                for row in connection.execute(query).mappings()
            ]

    def approved_commands(self) -> list[tuple[str, str]]:
        """(approved plan id, run id) of every stored command that carried an approval."""
        query = (
            sa.select(commands.c.approved_plan_id, commands.c.run_id)
            .where(commands.c.approved_plan_id.is_not(None))
            .order_by(commands.c.occurred_at)
        )
        with self._read() as connection:
            return [(row[0], row[1]) for row in connection.execute(query)]

    def items_of_user(self, customer_id: str, user: str) -> list[ItemRecord]:
        """Every report line of one customer that names this SM user id, ShareFile user id or
        e-mail address (any spelling: compared by normalise_email)."""
        key = normalise_email(user)
        wanted = [report_items.c.user_id == user, report_items.c.sharefile_user_id == user]
        if key is not None:
            wanted += [report_items.c.email_key == key, report_items.c.match_key == key]
        query = (
            sa.select(report_items)
            .where(report_items.c.customer_id == customer_id, sa.or_(*wanted))
            .order_by(report_items.c.id)
        )
        with self._read() as connection:
            return [_item_record(row) for row in connection.execute(query).mappings()]

    def items_of_report(self, report_message_id: str) -> list[ItemRecord]:
        query = (
            sa.select(report_items)
            .where(report_items.c.report_message_id == report_message_id)
            .order_by(report_items.c.id)
        )
        with self._read() as connection:
            return [_item_record(row) for row in connection.execute(query).mappings()]

    def request_ids_of_user(
        self, customer_id: str, run_ids: Sequence[str], user_id: str
    ) -> dict[tuple[str, str], str]:
        """(run_id, action) → request_id for the requests of these runs that carry this user."""
        if not run_ids:
            return {}
        query = (
            sa.select(requests.c.run_id, request_items.c.action, requests.c.request_id)
            .join(request_items, request_items.c.request_id == requests.c.request_id)
            .where(
                requests.c.customer_id == customer_id,
                requests.c.run_id.in_(list(run_ids)),
                request_items.c.user_id == user_id,
            )
        )
        with self._read() as connection:
            return {(row.run_id, row.action): row.request_id for row in connection.execute(query)}

    def answers_for(
        self, request_ids: Sequence[str], user_id: str | None = None
    ) -> list[AnswerRecord]:
        if not request_ids:
            return []
        query = (
            sa.select(answer_items, answers.c.occurred_at, answers.c.error)
            .join(answers, answers.c.message_id == answer_items.c.answer_message_id)
            .where(answer_items.c.request_id.in_(list(request_ids)))
        )
        if user_id is not None:
            query = query.where(answer_items.c.user_id == user_id)
        with self._read() as connection:
            return [
                AnswerRecord(
                    request_id=row["request_id"],
                    user_id=row["user_id"],
                    action=row["action"],
                    status=row["status"],
                    error_code=row["error_code"],
                    error_message=row["error_message"] or row["error"],
                    occurred_at=_utc(row["occurred_at"]),
                )
                for row in connection.execute(query).mappings()
            ]

    def requested_items(
        self, *, customer_id: str | None = None, run_id: str | None = None
    ) -> list[RequestedItem]:
        """One row per item of every published request, with Services Manager's answer."""
        query = (
            sa.select(
                requests.c.customer_id,
                requests.c.run_id,
                requests.c.request_id,
                requests.c.occurred_at,
                request_items.c.user_id,
                request_items.c.email,
                request_items.c.action,
                request_items.c.rule,
            )
            .join(request_items, request_items.c.request_id == requests.c.request_id)
            .order_by(
                requests.c.occurred_at,
                requests.c.customer_id,
                requests.c.part,
                request_items.c.position,
            )
        )
        if customer_id is not None:
            query = query.where(requests.c.customer_id == customer_id)
        if run_id is not None:
            query = query.where(requests.c.run_id == run_id)
        with self._read() as connection:
            rows = list(connection.execute(query).mappings())
        answered: dict[tuple[str, str, str], list[AnswerRecord]] = {}
        request_ids = sorted({row["request_id"] for row in rows})
        for start in range(0, len(request_ids), 500):  # bounded IN lists
            for answer in self.answers_for(request_ids[start : start + 500]):
                answered.setdefault((answer.request_id, answer.user_id, answer.action), []).append(
                    answer
                )
        result = []
        for row in rows:
            best = best_answer(answered.get((row["request_id"], row["user_id"], row["action"]), []))
            result.append(
                RequestedItem(
                    customer_id=row["customer_id"],
                    run_id=row["run_id"],
                    request_id=row["request_id"],
                    user_id=row["user_id"],
                    email=row["email"],
                    action=row["action"],
                    rule=row["rule"],
                    requested_at=_utc(row["occurred_at"]),
                    status=best.status if best else "unanswered",
                    error_code=best.error_code if best else None,
                )
            )
        return result

    def reported_customers(self, run_id: str) -> set[str]:
        query = sa.select(reports.c.customer_id).where(reports.c.run_id == run_id).distinct()
        with self._read() as connection:
            return {row.customer_id for row in connection.execute(query)}

    def answered_request_ids(self, run_id: str) -> set[str]:
        query = sa.select(answers.c.request_id).where(answers.c.run_id == run_id).distinct()
        with self._read() as connection:
            return {row.request_id for row in connection.execute(query)}

    def event_count(self) -> int:
        with self._read() as connection:
            return int(
                connection.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
            )

    def table_counts(self) -> dict[str, int]:
        """Rows per table (tests and diagnostics)."""
        with self._read() as connection:
            return {
                table.name: int(
                    connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                )
                for table in V1_TABLES
            }

    # -- connections --

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise TransientError(
                    f"audit database unavailable: {_first_line(exc)}", call="audit database"
                ) from None
            if type(exc) is DatabaseError:
                # Neither a query's fault nor a passing one: SQLite's "file is not a database".
                raise ConfigError(
                    f"SFSYNC_DATABASE_URL={self.redacted_url} cannot be used as the audit "
                    f"database: {_first_line(exc)}"
                ) from None
            raise

    _read = _begin


def _insert_or_ignore(connection: Connection, table: sa.Table, keys: list[str]) -> Any:
    """INSERT … ON CONFLICT (keys) DO NOTHING, in the connection's dialect."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=keys)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=keys)


def _insert_ignoring_duplicates(
    connection: Connection, table: sa.Table, row: dict[str, Any], keys: list[str]
) -> bool:
    """Insert one row unless its keys are taken; True if the row is new. RETURNING says so on
    both dialects (rowcount is -1 with psycopg here)."""
    statement = _insert_or_ignore(connection, table, keys)
    statement = statement.returning(*(table.c[key] for key in keys))
    return connection.execute(statement, row).first() is not None


def _item_rows(report: SyncReport) -> Iterator[dict[str, Any]]:
    for category, items in (
        (Category.PROVISION, report.provision),
        (Category.DEPROVISION, report.deprovision),
        (Category.HELD, report.held),
    ):
        for item in items:
            yield _row(
                category,
                user_id=item.user_id,
                email=item.email,
                action=item.action.value,
                rule=item.rule.value,
                match_key=item.match_key,
                sm_state=item.sm_state.value,
                sharefile_user_id=item.sharefile_user_id,
            )
    for pending in report.pending:
        yield _row(
            Category.PENDING,
            user_id=pending.user_id,
            email=pending.email,
            sm_state=pending.state.value,
            sharefile_user_id=pending.sharefile_user_id,
        )
    for skipped in report.skipped:
        yield _row(
            Category.SKIPPED,
            user_id=skipped.user_id,
            email=skipped.email,
            sharefile_user_id=skipped.sharefile_user_id,
            detail=skipped.reason.value,
        )
    for unmatched in report.unmatched:
        yield _row(
            Category.UNMATCHED,
            user_id=None,
            email=unmatched.email,
            match_key=unmatched.match_key,
            sharefile_user_id=unmatched.sharefile_user_id,
            detail="disabled in ShareFile" if unmatched.is_disabled else None,
        )
    for conflict in report.conflicts:
        detail = (
            f"{len(conflict.sm_user_ids)} Services Manager and "
            f"{len(conflict.sharefile_user_ids)} ShareFile users share this key"
        )
        for sm_id in conflict.sm_user_ids:
            yield _row(
                Category.CONFLICT,
                user_id=sm_id,
                email=None,
                match_key=conflict.match_key,
                detail=detail,
            )
        for sf_id in conflict.sharefile_user_ids:
            yield _row(
                Category.CONFLICT,
                user_id=None,
                email=None,
                match_key=conflict.match_key,
                sharefile_user_id=sf_id,
                detail=detail,
            )


def _row(
    category: Category, *, user_id: str | None, email: str | None, **fields: Any
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(
        ("action", "rule", "match_key", "sm_state", "sharefile_user_id", "detail")
    )
    row.update(fields)
    row.update(
        category=category.value,
        user_id=user_id,
        email=email,
        email_key=normalise_email(email),
    )
    return row


def _report_record(row: sa.RowMapping) -> ReportRecord:
    counts = row["counts"]
    reasons = row["hold_reasons"]
    # Some drivers hand JSON back as text.
    if isinstance(counts, str):
        counts = json.loads(counts)
    if isinstance(reasons, str):
        reasons = json.loads(reasons)
    return ReportRecord(
        message_id=row["message_id"],
        customer_id=row["customer_id"],
        run_id=row["run_id"],
        outcome=row["outcome"],
        dry_run=bool(row["dry_run"]),
        plan_id=row["plan_id"],
        approved=bool(row["approved"]),
        counts={str(k): int(v) for k, v in counts.items()},
        hold_reasons=tuple(HoldReason.model_validate(r) for r in reasons),
        error=row["error"],
        occurred_at=_utc(row["occurred_at"]),
    )


def _item_record(row: sa.RowMapping) -> ItemRecord:
    return ItemRecord(
        report_message_id=row["report_message_id"],
        category=Category(row["category"]),
        user_id=row["user_id"],
        email=row["email"],
        action=row["action"],
        rule=row["rule"],
        match_key=row["match_key"],
        sm_state=row["sm_state"],
        sharefile_user_id=row["sharefile_user_id"],
        detail=row["detail"],
    )


def _utc(value: datetime) -> datetime:
    # SQLite keeps no time zone: everything stored is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _first_line(exc: BaseException) -> str:
    # DBAPI errors may quote the statement and its parameters: keep only the driver's message.
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
