"""What every sfsync command shares: exit codes, settings loading, errors as exits, signals."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

from domain.errors import ConfigError, SfsyncError
from domain.messages import CUSTOMER_ID_PATTERN
from sfsync.logs import configure_logging, register_secret
from sfsync.settings import Settings, load_settings, unknown_variables

if TYPE_CHECKING:
    from adapters.audit_store import AuditStore
    from adapters.broker import Broker


EXIT_OK = 0

EXIT_RUN_FAILED = 1  # the run finished, but some customers or requests failed

EXIT_CONFIG = 2  # bad settings or arguments (click uses 2 for usage errors too)

EXIT_TIMEOUT = 3

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it

console = Console(stderr=True)


class CustomerIdType(click.ParamType):
    """A customer id as the messages take it: a usage error (exit 2) here, not a traceback."""

    name = "ID"
    _valid = re.compile(CUSTOMER_ID_PATTERN)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, str) and self._valid.fullmatch(value):
            return value
        self.fail(
            f"{value!r} is not a customer id (1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)",
            param,
            ctx,
        )


CUSTOMER_ID = CustomerIdType()


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    for line in message.splitlines():
        click.echo(f"sfsync: {line}", err=True)
    sys.exit(code)


def _settings(*, configure_logs: bool = True, **overrides: Any) -> Settings:
    """The settings (given overrides that are not None win), or exit 2 naming every problem.
    `configure_logs=False` leaves logging alone: `status` prints a table, and pika's notes on the
    queues it finds missing (passive declares) are not the operator's business."""
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        _fail(f"configuration error:\n{exc}")
    if configure_logs:
        configure_logging(settings.log_level)
    for secret in settings.secret_values():
        register_secret(secret)
    _warn_unknown_variables()
    return settings


def _warn_unknown_variables() -> None:
    for name, close in unknown_variables():
        hint = f" (did you mean {close}?)" if close else ""
        click.echo(f"sfsync: warning: {name} is not a setting and is ignored{hint}", err=True)


@contextmanager
def _errors_as_exit() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        _fail(f"configuration error:\n{exc}")
    except SfsyncError as exc:
        _fail(str(exc), code=EXIT_RUN_FAILED)


def _serve_metrics(settings: Settings, role: str) -> None:
    """Start the Prometheus endpoint when SFSYNC_METRICS_PORT is set (0: any free port)."""
    if settings.metrics_port is None:
        return
    from adapters.metrics import start_metrics_server

    try:
        port = start_metrics_server(settings.metrics_port)
    except OSError as exc:
        _fail(f"SFSYNC_METRICS_PORT={settings.metrics_port}: cannot serve metrics there: {exc}")
    click.echo(f"sfsync {role}: Prometheus metrics on :{port}/metrics", err=True)


def _wait_for_signal(broker: Broker | None = None) -> None:
    """Block until SIGTERM or SIGINT; raise the broker's failure if it ends for good meanwhile
    (RabbitMQ refusing the topology on a reconnect, say): a role that can no longer consume
    must exit, not idle, so that whoever runs it notices and restarts it."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        # Counted first, in one step: a second signal can run this handler again inside the
        # first call (a handler runs between any two bytecodes of the main thread), before the
        # first has set `stop`; it must still see a second signal, and exit.
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            # A second signal: stop now. Unacknowledged messages go back to their queues, and
            # every handler is idempotent, so nothing is lost, only done again.
            # os.write, not click.echo: the main thread may be inside a write to stderr, and a
            # buffered write from the handler would then raise instead of exiting.
            os.write(2, f"sfsync: {name} received again, exiting now\n".encode())
            os._exit(EXIT_INTERRUPTED)
        click.echo(
            f"sfsync: {name} received, finishing in-flight work (again to exit now)", err=True
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        failure = broker.failure() if broker is not None else None
        if failure is not None:
            raise failure


broker_option = click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="memory:// or amqp://… (default: SFSYNC_BROKER_URL, the better place for a URL with a "
    "password: a command line is visible to every user of the host)",
)


@contextmanager
def _audit_store(
    settings: Settings, *, enabled: bool = True, reading: bool = False
) -> Iterator[AuditStore | None]:
    """The migrated store of SFSYNC_DATABASE_URL (None when not enabled); closed on exit.

    `reading`: a command that only reads the trail. Where no SQLite file was, it says that the
    trail it reads was created empty just now: run from another directory, `held` would
    otherwise answer "no held plans" as if all were clear."""
    if not enabled:
        yield None
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from sfsync.audit import open_store

    try:
        url = make_url(settings.database_url.get_secret_value())
        sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
    except ArgumentError:
        sqlite_file = None  # open_store says what is wrong with it
    new_file = sqlite_file not in (None, "", ":memory:") and not os.path.exists(str(sqlite_file))
    with _errors_as_exit():
        store = open_store(settings)
    if reading and new_file:
        click.echo(
            f"sfsync: note: there was no audit database at {store.redacted_url}: this one was "
            "created empty just now (is SFSYNC_DATABASE_URL, or the directory, the right one?)",
            err=True,
        )
    try:
        yield store
    finally:
        store.close()


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _table_console() -> Console:
    # Not a terminal (a pipe, CI): still a full-width table rather than 80 squeezed columns.
    return Console() if sys.stdout.isatty() else Console(width=200)
