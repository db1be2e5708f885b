"""Operator commands `sfsync status` (queue depths and rates) and `sfsync schema` (contracts)."""

from __future__ import annotations

from pathlib import Path

import click

from adapters.topology import Topology
from sfsync.cli._common import EXIT_CONFIG, EXIT_RUN_FAILED, _fail, _settings, _table_console

EXIT_UNAVAILABLE = EXIT_RUN_FAILED  # neither the management API nor AMQP answered
__all__ = ["EXIT_CONFIG", "EXIT_UNAVAILABLE", "schema", "status"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="amqp://… (default: SFSYNC_BROKER_URL, the better place for a URL with a password)",
)
@click.option(
    "--management-url",
    metavar="URL",
    help="RabbitMQ management API, http://user:pass@host:15672 (default: SFSYNC_MANAGEMENT_URL, "
    "the better place for a password: a command line is visible to every user of the host)",
)
@click.option("--prefix", help="queue name prefix (default: SFSYNC_PREFIX)")
def status(
    as_json: bool, broker_url: str | None, management_url: str | None, prefix: str | None
) -> None:
    """Show ready, unacked, consumers and rates of every sfsync queue; parked messages stand out.

    Reads the RabbitMQ management API; without it, depths and consumer counts come from a
    passive declare over AMQP (no rates). Exit 1 when neither answers.
    """
    from sfsync.status import StatusUnavailable, collect_status, render_json, render_table

    settings = _settings(
        configure_logs=False,
        broker_url=broker_url,
        management_url=management_url,
        prefix=prefix,
    )
    amqp_urls = [url for url in settings.broker_url if url != "memory://"]
    topology = Topology(prefix=settings.prefix)
    management = settings.management_url.get_secret_value() if settings.management_url else None
    if management is None and not amqp_urls:
        _fail(
            "`sfsync status` reads RabbitMQ: set SFSYNC_MANAGEMENT_URL or an amqp:// "
            "SFSYNC_BROKER_URL (memory:// has no queues to show)"
        )
    # The nodes of a cluster in turn: the one that is down is when status matters most.
    problems: list[str] = []
    candidates: list[str | None] = [*amqp_urls] or [None]
    for amqp_url in candidates:
        try:
            report = collect_status(topology, management_url=management, amqp_url=amqp_url)
            break
        except StatusUnavailable as exc:
            problems.append(str(exc))
    else:
        _fail(f"no queue statistics: {'; '.join(problems)}", code=EXIT_UNAVAILABLE)
    if as_json:
        click.echo(render_json(report), nl=False)
    else:
        render_table(report, _table_console())


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs"),
    show_default=True,
    help="folder for asyncapi.yaml and schemas/*.json",
)
def schema(out: Path) -> None:
    """Write the AsyncAPI document and one JSON Schema per message type from the models."""
    from sfsync.schema import write_documents

    try:
        written = write_documents(out)
    except OSError as exc:
        _fail(f"cannot write the documents to {out}: {exc.strerror or exc}")
    for path in written:
        click.echo(str(path))
