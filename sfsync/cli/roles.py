"""The long-running roles: worker, submitter, scheduler, audit, and request-sync for others."""

from __future__ import annotations

import contextlib
import sys
import threading

import click

from sfsync.cli._common import (
    CUSTOMER_ID,
    _errors_as_exit,
    _fail,
    _serve_metrics,
    _settings,
    _wait_for_signal,
    broker_option,
)
from sfsync.settings import Settings


@click.command()
@broker_option
@click.option(
    "--concurrency", type=int, help="messages handled at once (default: SFSYNC_CONCURRENCY)"
)
def worker(broker_url: str | None, concurrency: int | None) -> None:
    """Consume sync commands and events; publish provisioning requests and reports."""
    _serve(role="worker", broker_url=broker_url, concurrency=concurrency)


@click.command()
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
    set_switch_interval(settings)
    with (
        _errors_as_exit(),
        running(
            settings, worker=role == "worker", submitter=role == "submitter", name=f"sfsync-{role}"
        ) as roles,
    ):
        click.echo(
            f"sfsync {role}: consuming (concurrency {settings.concurrency}); Ctrl-C to stop",
            err=True,
        )
        _serve_metrics(settings, role)
        _wait_for_signal(roles.broker)
    click.echo(f"sfsync {role}: stopped cleanly", err=True)


def _bounded_text(value: str | None, option: str, shortest: int, longest: int) -> str | None:
    """A free-text option within the event's limits: a usage error (exit 2), not a traceback."""
    if value is not None and not shortest <= len(value) <= longest:
        raise click.BadParameter(f"{option} takes {shortest} to {longest} characters")
    return value


def set_switch_interval(settings: Settings) -> None:
    """Let a thread of this process hold the GIL for SFSYNC_SWITCH_INTERVAL_MS (default 20 ms;
    Python's own is 5 ms) before a waiting thread may force a switch.

    A worker's threads mostly give the GIL up on their own, at every network wait; forced
    switches matter when the host's cores are oversubscribed (most likely a GIL holder is
    descheduled, the process's waiting threads time out and demand the GIL, and each forced
    hand-over wakes two threads). Measured with 4 worker processes of 32 threads on 2 cores
    (2,000 customers, 20 ms per API call, alternating, 3 rounds in each of two runs): every
    cycle was faster with 20 ms, medians 8.24 -> 7.63 s and 8.84 -> 8.23 s, with 3-6 % less
    worker CPU; with 1 or 2 processes it made no difference (docs/performance.md, fix 12).
    A thread that computes for long (the reconcile of a big customer) still yields every 20 ms,
    so pika's I/O thread keeps up with heartbeats and confirms.
    """
    sys.setswitchinterval(settings.switch_interval_ms / 1000)


@click.command()
@broker_option
@click.option("--once", is_flag=True, help="publish one run and exit (default)")
@click.option(
    "--interval",
    type=click.FloatRange(min=1.0),
    metavar="SECONDS",
    help="publish a run every SECONDS (at least 1)",
)
@click.option(
    "--customer", "customers", type=CUSTOMER_ID, multiple=True, help="only these customers"
)
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

    if once and interval is not None:
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
        _serve_metrics(settings, "scheduler")
        try:
            _wait_for_signal(roles.broker)
        finally:
            stop.set()
            thread.join()


@click.command("request-sync")
@broker_option
@click.option("--customer", type=CUSTOMER_ID, required=True)
@click.option(
    "--source",
    type=click.STRING,
    required=True,
    callback=lambda _ctx, _param, value: _bounded_text(value, "--source", 1, 200),
    help="the system asking (recorded in the event)",
)
@click.option(
    "--reason",
    callback=lambda _ctx, _param, value: _bounded_text(value, "--reason", 0, 500),
    help="why, in a few words",
)
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


@click.command("audit")
@broker_option
def audit_command(broker_url: str | None) -> None:
    """Store every event (reports, plan items, holds, requests, answers) in the audit database."""
    from sfsync.audit import audit_role, build_audit_broker

    settings = _settings(broker_url=broker_url)
    if settings.uses_memory_broker:
        _fail("`sfsync audit` needs a shared broker: set SFSYNC_BROKER_URL or --broker amqp://…")
    with _errors_as_exit(), contextlib.ExitStack() as stack:
        broker = build_audit_broker(settings, name="sfsync-audit")
        broker.start()
        stack.callback(broker.close)
        store = stack.enter_context(audit_role(settings, broker=broker))
        click.echo(
            f"sfsync audit: storing events in {store.redacted_url} "
            f"(schema version {store.version()}); Ctrl-C to stop",
            err=True,
        )
        _serve_metrics(settings, "audit")
        _wait_for_signal(broker)
    click.echo("sfsync audit: stopped cleanly", err=True)
