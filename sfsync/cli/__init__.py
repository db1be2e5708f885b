"""The `sfsync` command: one subcommand per role, one-shot runs, the audit trail and operations."""

from __future__ import annotations

import click

from sfsync.cli import audit, ops, roles, runs
from sfsync.cli._common import EXIT_CONFIG, EXIT_OK, EXIT_RUN_FAILED, EXIT_TIMEOUT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_TIMEOUT", "main"]
