"""The `sfsync` command: clear exits for bad configuration and misuse, before touching anything."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from sfsync.cli import EXIT_CONFIG, main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run(*args: str, **env: str):
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize("role", ["worker", "submitter", "scheduler"])
def test_long_running_roles_refuse_the_embedded_broker(role: str) -> None:
    result = run(role)
    assert result.exit_code == EXIT_CONFIG
    assert "needs a shared broker" in result.output


def test_bad_settings_exit_with_one_line_per_problem_and_no_secret() -> None:
    result = run(
        "sync", SFSYNC_CONCURRENCY="0", SFSYNC_PREFIX="bad prefix!", SFSYNC_SM_TOKEN="tok-123"
    )
    assert result.exit_code == EXIT_CONFIG
    lines = [line for line in result.output.splitlines() if line.startswith("sfsync: SFSYNC_")]
    assert len(lines) == 2
    assert "tok-123" not in result.output


def test_sync_without_services_manager_settings_names_what_is_missing() -> None:
    result = run("sync")
    assert result.exit_code == EXIT_CONFIG
    assert "SFSYNC_SM_URL: required for this command" in result.output
    assert "SFSYNC_SM_TOKEN: required for this command" in result.output


def test_scheduler_rejects_once_together_with_interval() -> None:
    result = run("scheduler", "--once", "--interval", "60", SFSYNC_BROKER_URL="amqp://localhost/")
    assert result.exit_code == EXIT_CONFIG
    assert "either --once or --interval" in result.output


def test_no_local_workers_needs_a_shared_broker() -> None:
    result = run("sync", "--no-local-workers")
    assert result.exit_code == EXIT_CONFIG
    assert "needs a shared broker" in result.output


def test_every_role_has_help() -> None:
    for command in ("worker", "submitter", "scheduler", "sync", "demo", "simulate", "request-sync"):
        result = run(command, "--help")
        assert result.exit_code == 0, command
        assert "Usage: " in result.output
