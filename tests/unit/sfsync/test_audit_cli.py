"""The operations commands on an empty or unreachable audit database: clear answers, no secrets."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner, Result

from sfsync.cli import EXIT_CONFIG, EXIT_RUN_FAILED, main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def test_every_operations_command_has_help() -> None:
    for command in ("audit", "why", "report", "held", "approve"):
        result = run(command, "--help")
        assert result.exit_code == 0, command
        assert "Usage: " in result.output


def test_the_audit_role_refuses_the_embedded_broker() -> None:
    result = run("audit")
    assert result.exit_code == EXIT_CONFIG
    assert "needs a shared broker" in result.output


def test_an_empty_audit_trail_answers_plainly(tmp_path) -> None:
    assert run("held").stdout.strip() == "no held plans waiting for approval"
    assert run("report").stdout.strip() == "no runs in the audit trail"
    assert run("report", "--format", "csv").stdout.strip() == (
        "customer,run,request_id,user_id,email,action,rule,sm_status,sm_error_code"
    )
    why = run("why", "--customer", "cust-1", "--user", "a@example.com")
    assert why.exit_code == EXIT_RUN_FAILED
    assert "nothing in the audit trail (sqlite:///sfsync-audit.db)" in why.output
    assert (tmp_path / "sfsync-audit.db").exists()  # the default database, in the working directory


def test_reading_a_trail_that_did_not_exist_says_it_was_created_empty(tmp_path) -> None:
    # From the wrong directory, `held` answered "no held plans" as if all were clear.
    first = run("held")
    assert "there was no audit database at sqlite:///sfsync-audit.db" in first.stderr
    assert first.stdout.strip() == "no held plans waiting for approval"
    again = run("held")
    assert "there was no audit database" not in again.stderr


def test_approving_an_unknown_plan_is_refused_with_exit_2() -> None:
    result = run("approve", "plan-nope")
    assert result.exit_code == EXIT_CONFIG
    assert "plan-nope is not a held plan in the audit trail" in result.output


def test_an_unreachable_database_is_reported_without_its_password() -> None:
    url = "postgresql+psycopg://ops:hunter2@127.0.0.1:1/audit?connect_timeout=2"
    result = run("held", SFSYNC_DATABASE_URL=url)
    assert result.exit_code == EXIT_RUN_FAILED
    assert "audit database unavailable" in result.output
    assert "hunter2" not in result.output


def test_a_database_url_of_another_kind_is_a_configuration_error_without_its_password() -> None:
    result = run("report", SFSYNC_DATABASE_URL="mysql://ops:hunter2@db.example/audit")
    assert result.exit_code == EXIT_CONFIG
    assert "is not SQLite or PostgreSQL" in result.output and "hunter2" not in result.output
