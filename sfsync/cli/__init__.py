"""The `sfsync` command: one subcommand per role, one-shot runs, the audit trail and operations."""

from __future__ import annotations

import click

from sfsync.cli import audit, ops, roles, runs
from sfsync.cli._common import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
)


class _Sfsync(click.Group):
    """Ctrl-C during a command (a `sync` waiting for its reports, say) exits 130, as shells
    expect, not click's "Aborted!" with 1, which means "a customer failed" here. The roles
    handle SIGINT themselves and finish their in-flight work."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("sfsync: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Sfsync, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sfsync")
def main() -> None:
    """Keep Services Manager's ShareFile provisioning in step with ShareFile's employees."""


for command in (
    roles.worker,
    roles.submitter,
    roles.scheduler,
    roles.audit_command,
    roles.request_sync_command,
    runs.sync,
    runs.demo,
    runs.simulate,
    audit.why,
    audit.report_command,
    audit.held,
    audit.approve,
    ops.status,
    ops.schema,
):
    main.add_command(command)

__all__ = ["EXIT_CONFIG", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_TIMEOUT", "main"]
