"""One sync cycle in one process: every role on one broker, until every customer is reported."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from consumers.run_tracker import RunProgress, RunResult
from sfsync.bootstrap import new_run_id, track_run
from sfsync.settings import Settings

if TYPE_CHECKING:
    from adapters.audit_store import AuditStore

log = logging.getLogger("sfsync.sync")


class RunTimeout(Exception):
    """The run did not finish in time; `result` holds what was reported so far."""

    def __init__(self, result: RunResult, timeout_s: float) -> None:
        self.result = result
        super().__init__(
            f"run {result.run_id} not finished after {timeout_s:.0f}s: "
            f"{len(result.missing)} of {len(result.customer_ids)} customers not reported"
        )


def sync_once(
    settings: Settings,
    *,
    customer_ids: Sequence[str] = (),
    dry_run: bool = False,
    approved_plan_id: str | None = None,
    timeout_s: float = 3600.0,
    local_workers: bool = True,
    on_progress: Callable[[RunProgress], None] | None = None,
    overrides: dict[str, Any] | None = None,
    audit: AuditStore | None = None,
) -> RunResult:
    """Schedule one run, process it (with in-process workers unless `local_workers` is False,
    e.g. when worker processes already consume the queues) and return every report.

    With `audit`, an in-process audit consumer stores the run's events there, and the call returns
    only once the store holds every report and answer of the run."""
    from sfsync.audit import running_with_audit, wait_until_recorded

    run_id = new_run_id()
    with running_with_audit(
        settings,
        store=audit,
        worker=local_workers,
        submitter=local_workers,
        scheduler=True,
        name="sfsync-sync",
        overrides=overrides,
    ) as roles:
        assert roles.scheduler is not None
        # Listen before publishing, so that no event of this run can be missed.
        tracker, listener = track_run(roles, settings, run_id)
        started = time.monotonic()  # the deadline counts the customer listing too
        try:
            roles.scheduler.run_once(
                customer_ids=list(customer_ids) or None,
                dry_run=dry_run,
                approved_plan_id=approved_plan_id,
                reason="manual",
                run_id=run_id,
                on_listed=tracker.expect,
            )
            left = max(0.0, timeout_s - (time.monotonic() - started))
            if not tracker.wait(left, on_progress=on_progress):
                raise RunTimeout(tracker.result, timeout_s)
            if audit is not None:
                wait_until_recorded(audit, tracker.result)
        finally:
            listener.stop()
        return tracker.result
