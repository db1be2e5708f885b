"""Follows one sync run through its events until every customer is reported and answered."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.errors import SfsyncError
from domain.messages import (
    Envelope,
    ProvisioningCompleted,
    ProvisioningFailed,
)
from domain.report import Outcome, SyncReport


@dataclass(frozen=True)
class RunProgress:
    customers: int
    reported: int
    failed: int
    held: int
    requests: int
    answered: int

    @property
    def done(self) -> bool:
        return self.reported >= self.customers and self.answered >= self.requests


@dataclass
class RunResult:
    run_id: str
    customer_ids: tuple[str, ...]
    reports: dict[str, SyncReport] = field(default_factory=dict)
    answers: dict[str, ProvisioningCompleted | ProvisioningFailed] = field(default_factory=dict)
    # Reports received more than once for one customer (a redelivered command): not errors.
    duplicate_reports: int = 0

    @property
    def missing(self) -> list[str]:
        return [c for c in self.customer_ids if c not in self.reports]

    @property
    def failed(self) -> list[SyncReport]:
        return [r for r in self.reports.values() if r.outcome is Outcome.FAILED]

    @property
    def failed_requests(self) -> list[ProvisioningFailed]:
        return [a for a in self.answers.values() if isinstance(a, ProvisioningFailed)]


class RunTracker:
    """A handler for the run's listener queue; `wait()` blocks until the run is complete.

    Progress is kept as running counts, updated by each event in O(its request ids): `wait()`
    looks at it after every event, and recounting every report each time made following a run
    of N customers cost O(N²) (a third of the tracking process's CPU at 1,000 customers).
    """

    def __init__(self, run_id: str, customer_ids: Iterable[str] = ()) -> None:
        self.result = RunResult(run_id=run_id, customer_ids=tuple(customer_ids))
        self._expected_requests: set[str] = set()
        self._wanted: frozenset[str] = frozenset(self.result.customer_ids)
        # Counts over the reports of wanted customers (the latest report of each) ...
        self._outcomes: Counter[Outcome] = Counter()
        # ... and over the expected requests that have an answer.
        self._answered = 0
        self._changed = threading.Condition()

    def expect(self, customer_ids: Iterable[str]) -> None:
        """Set the customers of the run (known once the scheduler has listed them)."""
        with self._changed:
            self.result.customer_ids = tuple(customer_ids)
            self._wanted = frozenset(self.result.customer_ids)
            reports = self.result.reports
            self._outcomes = Counter(reports[c].outcome for c in self._wanted if c in reports)
            self._changed.notify_all()

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        if message.correlation_id != self.result.run_id:
            return []
        payload = message.payload
        with self._changed:
            if isinstance(payload, SyncReport):
                self._record_report(payload)
            elif isinstance(payload, ProvisioningCompleted | ProvisioningFailed):
                # A completed answer wins over a failure of the same request (a late retry).
                previous = self.result.answers.get(payload.request_id)
                if not isinstance(previous, ProvisioningCompleted):
                    self.result.answers[payload.request_id] = payload
                    if previous is None and payload.request_id in self._expected_requests:
                        self._answered += 1
            self._changed.notify_all()
        return []

    def _record_report(self, report: SyncReport) -> None:
        previous = self.result.reports.get(report.customer_id)
        if previous is not None:
            self.result.duplicate_reports += 1
        if report.customer_id in self._wanted:
            if previous is not None:
                self._outcomes[previous.outcome] -= 1
            self._outcomes[report.outcome] += 1
        self.result.reports[report.customer_id] = report
        for request_id in report.request_ids:
            if request_id not in self._expected_requests:
                self._expected_requests.add(request_id)
                if request_id in self.result.answers:
                    self._answered += 1

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        return []

    def progress(self) -> RunProgress:
        with self._changed:
            return self._progress()

    def _progress(self) -> RunProgress:
        outcomes = self._outcomes
        return RunProgress(
            customers=len(self._wanted),
            reported=sum(outcomes.values()),
            failed=outcomes[Outcome.FAILED],
            held=outcomes[Outcome.HELD],
            requests=len(self._expected_requests),
            answered=self._answered,
        )

    def wait(
        self,
        timeout_s: float | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        poll_s: float = 0.5,
    ) -> bool:
        """Block until every customer is reported and every request answered (True), or timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while True:
                progress = self._progress()
                if on_progress is not None:
                    on_progress(progress)
                if progress.done:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(poll_s if remaining is None else min(poll_s, remaining))
