"""One-shot runs for people: `sync`, the `demo`, and the `simulate` servers."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from consumers.run_tracker import RunProgress, RunResult
from domain.report import Outcome, render_text
from sfsync.cli._common import (
    CUSTOMER_ID,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
    _audit_store,
    _errors_as_exit,
    _fail,
    _settings,
    _wait_for_signal,
    broker_option,
    console,
)
from sfsync.logs import configure_logging
from sfsync.settings import Settings

if TYPE_CHECKING:
    from adapters.audit_store import AuditStore


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


@click.command()
@broker_option
@click.option(
    "--customer",
    "customers",
    type=CUSTOMER_ID,
    multiple=True,
    help="only these customers (repeatable)",
)
@click.option("--all", "all_customers", is_flag=True, help="every enabled customer (the default)")
@click.option("--dry-run", is_flag=True, help="plan and report, request nothing")
@click.option(
    "--approve-plan", metavar="PLAN_ID", help="release the held removals of exactly this plan"
)
@click.option("--json", "as_json", is_flag=True, help="print the reports as JSON")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="seconds to wait for the run",
)
@click.option(
    "--no-local-workers", is_flag=True, help="only schedule and wait; worker processes do the work"
)
@click.option(
    "--audit/--no-audit",
    default=None,
    help="store the run in the audit database (default: on with memory://; with a shared broker "
    "the `sfsync audit` role stores it)",
)
def sync(
    broker_url: str | None,
    customers: tuple[str, ...],
    all_customers: bool,
    dry_run: bool,
    approve_plan: str | None,
    as_json: bool,
    timeout: float,
    no_local_workers: bool,
    audit: bool | None,
) -> None:
    """Run one sync cycle now and print every customer's report."""
    if all_customers and customers:
        _fail("give either --all or --customer, not both")
    settings = _settings(broker_url=broker_url)
    if no_local_workers and settings.uses_memory_broker:
        _fail("--no-local-workers needs a shared broker (amqp://…)")
    with _audit_store(
        settings, enabled=settings.uses_memory_broker if audit is None else audit
    ) as (store):
        _run_and_report(
            settings,
            customers=customers,
            dry_run=dry_run,
            approve_plan=approve_plan,
            as_json=as_json,
            timeout=timeout,
            local_workers=not no_local_workers,
            audit=store,
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
    audit: AuditStore | None = None,
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
                audit=audit,
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


@click.command()
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
@click.option(
    "--audit/--no-audit",
    default=True,
    show_default=True,
    help="store the run in the audit database (SFSYNC_DATABASE_URL, default ./sfsync-audit.db)",
)
def demo(broker_url: str | None, as_json: bool, scenario: Path | None, audit: bool) -> None:
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
            if broker_url:
                # On a shared broker the demo's queues must not be a deployment's: its workers
                # would take the simulated customers' commands, and the demo's 1 s retry delay
                # would make the deployment's own declaration of its retry queue fail.
                settings = settings.model_copy(update={"prefix": f"{settings.prefix[:58]}-demo"})
            click.echo(
                f"demo: Services Manager simulator at {sims.sm_url}, ShareFile simulator at "
                f"{sims.sharefile_api_url_template.replace('{subdomain}/sf/v3/', '')}",
                err=True,
            )
            before = sims.sm_states()

            def show_changes(result: RunResult) -> None:
                if as_json:
                    _audit_hint(store, result)
                    return
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
                if any(report.held for report in result.reports.values()):
                    click.echo(
                        "(the demo's simulators stop with it: its held plan can be looked at with "
                        "`sfsync held`, but approving one needs a deployment's Services Manager)",
                        err=True,
                    )
                _audit_hint(store, result)

            with _audit_store(settings, enabled=audit) as store:
                _run_and_report(
                    settings, as_json=as_json, timeout=300, after=show_changes, audit=store
                )


def _audit_hint(store: AuditStore | None, result: RunResult) -> None:
    """One line on stderr: where the run was stored and a `why` that shows a removal."""
    if store is None:
        return
    example = next(
        (
            (report.customer_id, item.email or item.user_id)
            for report in result.reports.values()
            for item in report.deprovision + report.held
        ),
        None,
    )
    why = f"sfsync why --customer {example[0]} --user {example[1]}" if example else "sfsync report"
    click.echo(
        f"audit trail in {store.redacted_url}; try: {why} (also: sfsync held, sfsync report)",
        err=True,
    )


@click.command()
@click.option(
    "--scenario",
    "scenario_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="scenario file (default: the bundled demo)",
)
@click.option(
    "--fleet",
    type=click.IntRange(min=1),
    metavar="N",
    help="generate N customers instead of reading a file",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--sm-port", type=click.IntRange(0, 65535), default=8081, show_default=True)
@click.option("--sharefile-port", type=click.IntRange(0, 65535), default=8082, show_default=True)
@click.option(
    "--page-size",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="ShareFile page size; 0 = unpaged",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="added to every answer of both APIs",
)
@click.option(
    "--error-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="share of 503 answers, both APIs",
)
@click.option(
    "--throttle-rate",
    type=click.FloatRange(0, 1),
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
        sims = SimulatorServers(
            scenario,
            sm_faults=faults,
            sharefile_faults=faults,
            sharefile_page_size=page_size or None,
            host=host,
            sm_port=sm_port,
            sharefile_port=sharefile_port,
        )
        try:
            sims.start()  # stops what it started if it fails
        except OSError as exc:
            _fail(f"cannot serve on {host} ports {sm_port} and {sharefile_port}: {exc.strerror}")
        try:
            click.echo(
                f"Services Manager: {sims.sm_url} "
                f"(token {sims.sm_token!r}: the simulator's fixed test token)"
            )
            click.echo(f"ShareFile token URL: {sims.sharefile_token_url_template}")
            click.echo(f"ShareFile API URL:   {sims.sharefile_api_url_template}")
            click.echo(f"{len(scenario.customers)} customers; Ctrl-C to stop")
            _wait_for_signal()
        finally:
            sims.stop()
