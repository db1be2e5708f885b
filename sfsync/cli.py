"""The `sfsync` command: one subcommand per role, a one-shot sync, the demo and the simulators."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from consumers.run_tracker import RunProgress, RunResult
from domain.errors import ConfigError, SfsyncError
from domain.report import Outcome, render_text
from sfsync.logs import configure_logging
from sfsync.settings import Settings, load_settings

EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run finished, but some customers or requests failed
EXIT_CONFIG = 2  # bad settings or arguments (click uses 2 for usage errors too)
EXIT_TIMEOUT = 3

console = Console(stderr=True)
SUMMARY_COLUMNS = (
    "customer",
    "outcome",
    "provision",
    "deprovision",
    "held",
    "unmatched",
    "conflicts",
    "pending",
    "skipped",
)


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    for line in message.splitlines():
        click.echo(f"sfsync: {line}", err=True)
    sys.exit(code)


def _settings(**overrides: Any) -> Settings:
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        _fail(f"configuration error:\n{exc}")
    configure_logging(settings.log_level)
    return settings


@contextmanager
def _errors_as_exit() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        _fail(f"configuration error:\n{exc}")
    except SfsyncError as exc:
        _fail(str(exc), code=EXIT_RUN_FAILED)


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        click.echo(
            f"sfsync: {signal.Signals(signum).name} received, finishing in-flight work", err=True
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass


broker_option = click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="memory:// or amqp://… (default: SFSYNC_BROKER_URL)",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sfsync")
def main() -> None:
    """Keep Services Manager's ShareFile provisioning in step with ShareFile's employees."""


@main.command()
@broker_option
@click.option(
    "--concurrency", type=int, help="messages handled at once (default: SFSYNC_CONCURRENCY)"
)
def worker(broker_url: str | None, concurrency: int | None) -> None:
    """Consume sync commands and events; publish provisioning requests and reports."""
    _serve(role="worker", broker_url=broker_url, concurrency=concurrency)


@main.command()
@broker_option
@click.option(
    "--concurrency", type=int, help="requests posted at once (default: SFSYNC_CONCURRENCY)"
)
def submitter(broker_url: str | None, concurrency: int | None) -> None:
    """Consume provisioning requests and post them to Services Manager."""
    _serve(role="submitter", broker_url=broker_url, concurrency=concurrency)


def _serve(*, role: str, broker_url: str | None, concurrency: int | None) -> None:
    from sfsync.bootstrap import running

    settings = _settings(broker_url=broker_url, concurrency=concurrency)
    if settings.uses_memory_broker:
        _fail(f"`sfsync {role}` needs a shared broker: set SFSYNC_BROKER_URL or --broker amqp://…")
    with (
        _errors_as_exit(),
        running(
            settings, worker=role == "worker", submitter=role == "submitter", name=f"sfsync-{role}"
        ),
    ):
        click.echo(
            f"sfsync {role}: consuming (concurrency {settings.concurrency}); Ctrl-C to stop",
            err=True,
        )
        _wait_for_signal()
    click.echo(f"sfsync {role}: stopped cleanly", err=True)


@main.command()
@broker_option
@click.option("--once", is_flag=True, help="publish one run and exit (default)")
@click.option("--interval", type=float, metavar="SECONDS", help="publish a run every SECONDS")
@click.option("--customer", "customers", multiple=True, metavar="ID", help="only these customers")
@click.option("--dry-run", is_flag=True, help="workers report but request nothing")
def scheduler(
    broker_url: str | None,
    once: bool,
    interval: float | None,
    customers: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Publish one sync command per enabled customer (once, or every --interval seconds)."""
    from sfsync.bootstrap import running

    if once and interval:
        _fail("give either --once or --interval, not both")
    settings = _settings(broker_url=broker_url)
    if settings.uses_memory_broker:
        _fail(
            "`sfsync scheduler` needs a shared broker: set SFSYNC_BROKER_URL or --broker amqp://…"
        )
    with _errors_as_exit(), running(settings, scheduler=True, name="sfsync-scheduler") as roles:
        assert roles.scheduler is not None
        chosen = list(customers) or None
        if interval is None:
            run = roles.scheduler.run_once(customer_ids=chosen, dry_run=dry_run)
            click.echo(f"run {run.run_id}: {len(run.customer_ids)} sync commands published")
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=roles.scheduler.run_every,
            args=(interval, stop),
            kwargs={"customer_ids": chosen, "dry_run": dry_run},
            daemon=True,
        )
        thread.start()
        _wait_for_signal()
        stop.set()
        thread.join()


@main.command("request-sync")
@broker_option
@click.option("--customer", required=True, metavar="ID")
@click.option("--source", required=True, help="the system asking (recorded in the event)")
@click.option("--reason", help="why, in a few words")
def request_sync_command(
    broker_url: str | None, customer: str, source: str, reason: str | None
) -> None:
    """Publish a sync.requested event for one customer, as another system would."""
    from producers.scheduler import request_sync
    from sfsync.bootstrap import build_broker, default_stamper

    settings = _settings(broker_url=broker_url)
    if settings.uses_memory_broker:
        _fail(
            "`sfsync request-sync` needs a shared broker: set SFSYNC_BROKER_URL or --broker amqp://…"
        )
    with _errors_as_exit():
        broker = build_broker(settings, name="sfsync-request")
        broker.start()
        try:
            message_id = request_sync(
                broker, default_stamper(), customer_id=customer, source=source, reason=reason
            )
        finally:
            broker.close()
    click.echo(f"sync.requested {message_id} published for {customer}")


@main.command()
@broker_option
@click.option(
    "--customer", "customers", multiple=True, metavar="ID", help="only these customers (repeatable)"
)
@click.option("--dry-run", is_flag=True, help="plan and report, request nothing")
@click.option(
    "--approve-plan", metavar="PLAN_ID", help="release the held removals of exactly this plan"
)
@click.option("--json", "as_json", is_flag=True, help="print the reports as JSON")
@click.option(
    "--timeout", type=float, default=3600.0, show_default=True, help="seconds to wait for the run"
)
@click.option(
    "--no-local-workers", is_flag=True, help="only schedule and wait; worker processes do the work"
)
def sync(
    broker_url: str | None,
    customers: tuple[str, ...],
    dry_run: bool,
    approve_plan: str | None,
    as_json: bool,
    timeout: float,
    no_local_workers: bool,
) -> None:
    """Run one sync cycle now and print every customer's report."""
    settings = _settings(broker_url=broker_url)
    if no_local_workers and settings.uses_memory_broker:
        _fail("--no-local-workers needs a shared broker (amqp://…)")
    _run_and_report(
        settings,
        customers=customers,
        dry_run=dry_run,
        approve_plan=approve_plan,
        as_json=as_json,
        timeout=timeout,
        local_workers=not no_local_workers,
    )


def _run_and_report(
    settings: Settings,
    *,
    customers: tuple[str, ...] = (),
    dry_run: bool = False,
    approve_plan: str | None = None,
    as_json: bool = False,
    timeout: float = 3600.0,
    local_workers: bool = True,
    overrides: dict[str, Any] | None = None,
    after: Callable[[RunResult], None] | None = None,
) -> None:
    from sfsync.oneshot import RunTimeout, sync_once

    started = time.monotonic()
    with _errors_as_exit(), _progress_display() as on_progress:
        try:
            result = sync_once(
                settings,
                customer_ids=customers,
                dry_run=dry_run,
                approved_plan_id=approve_plan,
                timeout_s=timeout,
                local_workers=local_workers,
                on_progress=on_progress,
                overrides=overrides,
            )
        except RunTimeout as exc:
            _print_result(exc.result, as_json=as_json, seconds=time.monotonic() - started)
            _fail(str(exc), code=EXIT_TIMEOUT)
    _print_result(result, as_json=as_json, seconds=time.monotonic() - started)
    if after is not None:
        after(result)
    if result.failed or result.failed_requests:
        sys.exit(EXIT_RUN_FAILED)


@contextmanager
def _progress_display() -> Iterator[Callable[[RunProgress], None]]:
    """A live bar on a terminal; a plain line every few seconds otherwise."""
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("customers"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("sync", total=None, detail="")

            def update(p: RunProgress) -> None:
                bar.update(
                    task,
                    total=p.customers or None,
                    completed=p.reported,
                    detail=f"failed {p.failed}, held {p.held}, requests {p.answered}/{p.requests}",
                )

            yield update
        return
    last = [0.0]

    def line(p: RunProgress) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 or p.done:
            last[0] = now
            click.echo(
                f"progress: {p.reported}/{p.customers} customers reported, {p.failed} failed, "
                f"{p.held} held; requests {p.answered}/{p.requests} answered",
                err=True,
            )

    yield line


def _print_result(result: RunResult, *, as_json: bool, seconds: float) -> None:
    reports = [result.reports[c] for c in result.customer_ids if c in result.reports]
    if as_json:
        document = {
            "run_id": result.run_id,
            "seconds": round(seconds, 3),
            "customers": len(result.customer_ids),
            "missing": result.missing,
            "reports": [r.model_dump(mode="json") for r in reports],
            "requests": [a.model_dump(mode="json") for a in result.answers.values()],
        }
        click.echo(json.dumps(document, indent=2))
        return
    # Not a terminal (a pipe, CI): still a full-width table rather than 80 squeezed columns.
    out = Console() if sys.stdout.isatty() else Console(width=120)
    table = Table(title=f"sync run {result.run_id}", title_justify="left")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if column in ("customer", "outcome") else "right")
    for report in reports:
        counts = report.counts
        table.add_row(
            report.customer_id,
            report.outcome.value + (" (dry run)" if report.dry_run else ""),
            *(str(counts.get(k, "")) for k in SUMMARY_COLUMNS[2:]),
        )
    out.print(table)
    notes = [r for r in reports if r.outcome is not Outcome.COMPLETED]
    for report in notes:
        out.print(render_text(report))
    rejected = sum(
        1
        for a in result.answers.values()
        if hasattr(a, "items")
        for i in a.items
        if getattr(i, "status", "") == "rejected"
    )
    out.print(
        f"{len(reports)} of {len(result.customer_ids)} customers reported in {seconds:.1f}s; "
        f"{len(result.answers)} provisioning requests answered, "
        f"{len(result.failed_requests)} failed, "
        f"{rejected} items rejected"
    )


@main.command()
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="run the demo through RabbitMQ instead of memory://",
)
@click.option("--json", "as_json", is_flag=True, help="print the reports as JSON")
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="another scenario file",
)
def demo(broker_url: str | None, as_json: bool, scenario: Path | None) -> None:
    """Start both simulators with a bundled scenario and run one sync cycle against them."""
    from simulators import DEMO_SCENARIO_PATH, SimulatorServers, load_scenario

    with _errors_as_exit():
        loaded = load_scenario(scenario or DEMO_SCENARIO_PATH)
        with SimulatorServers(loaded) as sims, tempfile.TemporaryDirectory() as tmp:
            credentials = Path(tmp) / "sharefile-credentials.json"
            credentials.write_text(json.dumps({"*": sims.sharefile_credentials}))
            credentials.chmod(0o600)
            settings = _settings(
                broker_url=broker_url or "memory://",
                sm_url=sims.sm_url,
                sm_token=sims.sm_token,
                sharefile_token_url_template=sims.sharefile_token_url_template,
                sharefile_api_url_template=sims.sharefile_api_url_template,
                sharefile_credentials_file=credentials,
                retry_delay_s=1.0,
                # The demo's story is the table; per-customer log lines only if asked for.
                log_level=None if "SFSYNC_LOG_LEVEL" in os.environ else "WARNING",
            )
            click.echo(
                f"demo: Services Manager simulator at {sims.sm_url}, ShareFile simulator at "
                f"{sims.sharefile_api_url_template.replace('{subdomain}/sf/v3/', '')}",
                err=True,
            )
            before = sims.sm_states()

            def show_changes(_result: RunResult) -> None:
                after = sims.sm_states()
                changed = [
                    (customer, user, before[customer].get(user), state)
                    for customer, users in sorted(after.items())
                    for user, state in sorted(users.items())
                    if before.get(customer, {}).get(user) != state
                ]
                click.echo(f"\nServices Manager now: {len(changed)} users changed state")
                for customer, user, old, new in changed:
                    click.echo(f"  {customer} {user}: {old} → {new}")

            _run_and_report(
                settings, as_json=as_json, timeout=300, after=None if as_json else show_changes
            )


@main.command()
@click.option(
    "--scenario",
    "scenario_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="scenario file (default: the bundled demo)",
)
@click.option(
    "--fleet", type=int, metavar="N", help="generate N customers instead of reading a file"
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--sm-port", type=int, default=8081, show_default=True)
@click.option("--sharefile-port", type=int, default=8082, show_default=True)
@click.option(
    "--page-size", type=int, default=500, show_default=True, help="ShareFile page size; 0 = unpaged"
)
@click.option(
    "--latency-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="added to every answer of both APIs",
)
@click.option(
    "--error-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="share of 503 answers, both APIs",
)
@click.option(
    "--throttle-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="share of 429 answers, both APIs",
)
def simulate(
    scenario_path: Path | None,
    fleet: int | None,
    seed: int,
    host: str,
    sm_port: int,
    sharefile_port: int,
    page_size: int,
    latency_ms: float,
    error_rate: float,
    throttle_rate: float,
) -> None:
    """Serve the Services Manager and ShareFile simulators until Ctrl-C."""
    from simulators import (
        DEMO_SCENARIO_PATH,
        Faults,
        SimulatorServers,
        generate_fleet,
        load_scenario,
    )

    configure_logging("INFO")
    with _errors_as_exit():
        scenario = (
            generate_fleet(fleet, seed=seed)
            if fleet
            else load_scenario(scenario_path or DEMO_SCENARIO_PATH)
        )
        faults = Faults(
            latency_ms=latency_ms, error_rate=error_rate, throttle_rate=throttle_rate, seed=seed
        )
        with SimulatorServers(
            scenario,
            sm_faults=faults,
            sharefile_faults=faults,
            sharefile_page_size=page_size or None,
            host=host,
            sm_port=sm_port,
            sharefile_port=sharefile_port,
        ) as sims:
            click.echo(
                f"Services Manager: {sims.sm_url} "
                f"(token {sims.sm_token!r}: the simulator's fixed test token)"
            )
            click.echo(f"ShareFile token URL: {sims.sharefile_token_url_template}")
            click.echo(f"ShareFile API URL:   {sims.sharefile_api_url_template}")
            click.echo(f"{len(scenario.customers)} customers; Ctrl-C to stop")
            _wait_for_signal()
