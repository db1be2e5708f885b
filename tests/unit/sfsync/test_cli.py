"""The `sfsync` command: clear exits for bad configuration and misuse, before touching anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


@pytest.mark.parametrize("interval", ["0", "-1", "0.5"])
def test_scheduler_rejects_an_interval_under_a_second(interval: str) -> None:
    # --interval 0 once published a run in a tight loop (140,000 commands in ten minutes).
    for args in (("--interval", interval), ("--once", "--interval", interval)):
        result = run("scheduler", *args, SFSYNC_BROKER_URL="amqp://localhost/")
        assert result.exit_code == EXIT_CONFIG
        assert "Invalid value for '--interval'" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("sync", "--customer", "acme corp"),
        ("scheduler", "--customer", "-x"),
        ("request-sync", "--customer", "", "--source", "crm"),
        ("request-sync", "--customer", "c1", "--source", ""),
        ("request-sync", "--customer", "c1", "--source", "crm", "--reason", "x" * 501),
    ],
)
def test_arguments_the_messages_would_refuse_are_usage_errors(args: tuple[str, ...]) -> None:
    result = run(*args, SFSYNC_BROKER_URL="amqp://localhost/")
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "Invalid value for '--" in result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not a crash


def test_a_metrics_port_in_use_is_a_configuration_error() -> None:
    import socket

    from sfsync.cli._common import _serve_metrics
    from sfsync.settings import load_settings

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(metrics_port=port)
        with pytest.raises(SystemExit) as exited:
            _serve_metrics(settings, "worker")
    assert exited.value.code == EXIT_CONFIG


def test_no_local_workers_needs_a_shared_broker() -> None:
    result = run("sync", "--no-local-workers")
    assert result.exit_code == EXIT_CONFIG
    assert "needs a shared broker" in result.output


def test_every_role_has_help() -> None:
    for command in ("worker", "submitter", "scheduler", "sync", "demo", "simulate", "request-sync"):
        result = run(command, "--help")
        assert result.exit_code == 0, command
        assert "Usage: " in result.output


def test_all_and_customer_together_are_refused() -> None:
    result = run("sync", "--all", "--customer", "c1")
    assert result.exit_code == EXIT_CONFIG
    assert "either --all or --customer" in result.output


def test_progress_is_a_plain_line_when_not_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from consumers.run_tracker import RunProgress
    from sfsync.cli import runs

    monkeypatch.setattr(runs, "console", Console(file=io.StringIO(), force_terminal=False))
    lines: list[str] = []
    monkeypatch.setattr(runs.click, "echo", lambda text, err=False: lines.append(text))
    with runs._progress_display() as update:
        update(RunProgress(customers=10, reported=4, failed=1, held=0, requests=3, answered=2))
        update(RunProgress(customers=10, reported=10, failed=1, held=0, requests=3, answered=3))
    assert lines[0].startswith("progress: 4/10 customers reported, 1 failed")
    assert lines[-1].startswith("progress: 10/10 customers reported")


def test_progress_is_a_live_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from consumers.run_tracker import RunProgress
    from sfsync.cli import runs

    screen = io.StringIO()
    monkeypatch.setattr(runs, "console", Console(file=screen, force_terminal=True, width=100))
    with runs._progress_display() as update:
        update(RunProgress(customers=10, reported=4, failed=1, held=2, requests=3, answered=2))
    drawn = screen.getvalue()
    assert "4/10" in drawn and "failed 1, held 2" in drawn
    assert "━" in drawn  # the bar itself


@pytest.mark.parametrize("role", ["worker", "submitter"])
def test_consuming_roles_hold_the_gil_for_the_configured_switch_interval(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import sys

    import sfsync.bootstrap
    from sfsync.cli import roles

    seen: list[float] = []
    monkeypatch.setattr(
        sfsync.bootstrap,
        "running",
        lambda *args, **kwargs: contextlib.nullcontext(SimpleNamespace(broker=None)),
    )
    monkeypatch.setattr(
        roles, "_wait_for_signal", lambda _broker: seen.append(sys.getswitchinterval())
    )
    before = sys.getswitchinterval()
    try:
        default = run(role, SFSYNC_BROKER_URL="amqp://127.0.0.1:1/")
        chosen = run(role, SFSYNC_BROKER_URL="amqp://127.0.0.1:1/", SFSYNC_SWITCH_INTERVAL_MS="7.5")
    finally:
        sys.setswitchinterval(before)
    assert (default.exit_code, chosen.exit_code) == (0, 0), default.output + chosen.output
    assert seen == pytest.approx([0.020, 0.0075])


@pytest.mark.parametrize("value", ["0", "-5", "1001", "fast"])
def test_a_bad_switch_interval_stops_the_role_with_one_line(value: str) -> None:
    result = run("worker", SFSYNC_BROKER_URL="amqp://127.0.0.1:1/", SFSYNC_SWITCH_INTERVAL_MS=value)
    assert result.exit_code == EXIT_CONFIG
    lines = [line for line in result.output.splitlines() if line.startswith("sfsync: SFSYNC_")]
    assert len(lines) == 1 and lines[0].startswith("sfsync: SFSYNC_SWITCH_INTERVAL_MS:")


@pytest.mark.parametrize(
    "args",
    [
        ("simulate", "--fleet", "0"),
        ("simulate", "--error-rate", "2"),
        ("simulate", "--throttle-rate", "-0.1"),
        ("simulate", "--sm-port", "99999"),
        ("simulate", "--page-size", "-1"),
        ("simulate", "--latency-ms", "-100"),
        ("sync", "--timeout", "-5"),
        ("approve", "plan-x", "--timeout", "0"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "is not in the range" in result.output


def test_simulators_on_a_port_in_use_say_so_in_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run("simulate", "--sm-port", port, "--sharefile-port", "0")
    assert result.exit_code == EXIT_CONFIG
    assert f"cannot serve on 127.0.0.1 ports {port} and 0: Address already in use" in result.output


def test_schema_into_a_folder_that_cannot_be_made_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("schema", "--out", str(blocker / "docs"))
    assert result.exit_code == EXIT_CONFIG
    assert result.output.startswith(f"sfsync: cannot write the documents to {blocker / 'docs'}")


def test_ctrl_c_during_a_command_exits_130_not_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfsync.cli import EXIT_INTERRUPTED, runs

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_wait_for_signal", interrupted)
    result = run("simulate", "--sm-port", "0", "--sharefile-port", "0")
    assert result.exit_code == EXIT_INTERRUPTED == 130
    assert "sfsync: interrupted" in result.output and "Aborted!" not in result.output


def test_a_misspelt_setting_is_warned_about() -> None:
    result = run("held", SFSYNC_MAX_DEPROVISON="5")
    assert result.exit_code == 0
    assert (
        "sfsync: warning: SFSYNC_MAX_DEPROVISON is not a setting and is ignored "
        "(did you mean SFSYNC_MAX_DEPROVISION?)"
    ) in result.output


def _signalled(tmp_path: Path, code: str, signal_it: Callable[[Any], None]) -> tuple[int, str]:
    """Run `code` (which prints "waiting" before it waits for a signal) in a child process, call
    `signal_it` with that process, and give its exit code and standard error."""
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
    ) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == b"waiting\n"
            signal_it(process)
            _, errors = process.communicate(timeout=10)
        finally:
            process.kill()
    return process.returncode, errors.decode()


def test_a_second_signal_while_finishing_in_flight_work_exits_at_once(tmp_path: Path) -> None:
    import signal
    import time

    from sfsync.cli import EXIT_INTERRUPTED

    def twice(process: Any) -> None:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # finishing in-flight work
        process.send_signal(signal.SIGTERM)

    # A role stuck in its clean-up (a handler waiting on a slow API) after the first SIGTERM.
    code = (
        "import sys, time\n"
        "from sfsync.cli._common import _wait_for_signal\n"
        "print('waiting', flush=True)\n"
        "_wait_for_signal()\n"
        "time.sleep(60)\n"
    )
    returncode, stderr = _signalled(tmp_path, code, twice)

    assert returncode == EXIT_INTERRUPTED
    assert "SIGTERM received, finishing in-flight work" in stderr
    assert "SIGTERM received again, exiting now" in stderr


def test_a_second_signal_inside_the_first_ones_handler_exits_at_once(tmp_path: Path) -> None:
    import signal

    from sfsync.cli import EXIT_INTERRUPTED

    # The second SIGTERM arrives while the first one's handler is still writing its message
    # (a loaded host deschedules it there): the handler runs again inside itself, before the
    # first call has marked the signal as received.
    code = (
        "import os, signal, sys, time\n"
        "from sfsync.cli import _common\n"
        "echo, sent = _common.click.echo, []\n"
        "def echo_then_signal(*args, **kwargs):\n"
        "    echo(*args, **kwargs)\n"
        "    if not sent:\n"
        "        sent.append(1)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.5)\n"
        "_common.click.echo = echo_then_signal\n"
        "print('waiting', flush=True)\n"
        "_common._wait_for_signal()\n"
        "time.sleep(60)\n"
    )
    returncode, stderr = _signalled(
        tmp_path, code, lambda process: process.send_signal(signal.SIGTERM)
    )

    assert returncode == EXIT_INTERRUPTED, stderr
    assert "SIGTERM received again, exiting now" in stderr
