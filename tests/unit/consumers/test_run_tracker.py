"""The run tracker counts a run's reports and answers as they arrive, whatever their order."""

from __future__ import annotations

from typing import Any

from consumers.run_tracker import RunProgress, RunTracker
from domain.messages import (
    Envelope,
    ProvisioningCompleted,
    ProvisioningFailed,
    report_payload,
)
from domain.report import Outcome, SyncReport
from tests.fakes import fixed_stamper

STAMP = fixed_stamper()
RUN = "run-1"


def report(
    customer: str, outcome: Outcome = Outcome.COMPLETED, *requests: str, run: str = RUN
) -> Envelope[Any]:
    payload = SyncReport(customer_id=customer, run_id=run, outcome=outcome, request_ids=requests)
    return STAMP(report_payload(payload), correlation_id=run)


def completed(customer: str, request_id: str) -> Envelope[Any]:
    answer = ProvisioningCompleted(
        customer_id=customer, run_id=RUN, request_id=request_id, items=()
    )
    return STAMP(answer, correlation_id=RUN)


def failed(customer: str, request_id: str) -> Envelope[Any]:
    answer = ProvisioningFailed(customer_id=customer, run_id=RUN, request_id=request_id, error="x")
    return STAMP(answer, correlation_id=RUN)


def progress(**fields: int) -> RunProgress:
    counts = {"customers": 0, "reported": 0, "failed": 0, "held": 0, "requests": 0, "answered": 0}
    return RunProgress(**{**counts, **fields})


def test_reports_and_answers_complete_the_run() -> None:
    tracker = RunTracker(RUN, ["c1", "c2"])
    tracker.handle(report("c1", Outcome.COMPLETED, "req-1"))
    assert tracker.progress() == progress(customers=2, reported=1, requests=1)
    tracker.handle(completed("c1", "req-1"))
    tracker.handle(report("c2", Outcome.HELD))
    assert tracker.progress() == progress(customers=2, reported=2, held=1, requests=1, answered=1)
    assert tracker.progress().done
    assert tracker.wait(0)


def test_an_answer_before_its_report_counts_once_the_report_names_it() -> None:
    tracker = RunTracker(RUN, ["c1"])
    tracker.handle(completed("c1", "req-1"))
    assert tracker.progress() == progress(customers=1)
    tracker.handle(report("c1", Outcome.COMPLETED, "req-1"))
    assert tracker.progress() == progress(customers=1, reported=1, requests=1, answered=1)


def test_a_redelivered_report_replaces_the_first_and_is_counted_as_a_duplicate() -> None:
    tracker = RunTracker(RUN, ["c1"])
    tracker.handle(report("c1", Outcome.FAILED))
    tracker.handle(report("c1", Outcome.COMPLETED, "req-1"))
    assert tracker.progress() == progress(customers=1, reported=1, requests=1)
    assert tracker.result.duplicate_reports == 1
    assert tracker.result.failed == []


def test_a_late_completion_replaces_a_failure_without_counting_the_request_twice() -> None:
    tracker = RunTracker(RUN, ["c1"])
    tracker.handle(report("c1", Outcome.COMPLETED, "req-1"))
    tracker.handle(failed("c1", "req-1"))
    tracker.handle(completed("c1", "req-1"))
    tracker.handle(failed("c1", "req-1"))
    assert tracker.progress() == progress(customers=1, reported=1, requests=1, answered=1)
    assert isinstance(tracker.result.answers["req-1"], ProvisioningCompleted)


def test_reports_that_arrive_before_the_customer_list_count_once_it_is_known() -> None:
    tracker = RunTracker(RUN)
    tracker.handle(report("c1", Outcome.FAILED))
    tracker.handle(report("other", Outcome.COMPLETED))
    tracker.expect(["c1", "c2"])
    assert tracker.progress() == progress(customers=2, reported=1, failed=1)
    assert not tracker.wait(0)
    assert tracker.result.missing == ["c2"]


def test_events_of_other_runs_are_ignored() -> None:
    tracker = RunTracker(RUN, ["c1"])
    tracker.handle(report("c1", Outcome.COMPLETED, run="run-2"))
    assert tracker.progress() == progress(customers=1)
