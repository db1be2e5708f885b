"""The sync worker's handler, run with fakes: what it publishes for each kind of customer."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from consumers.sync_worker import SyncHandler
from domain.errors import PermanentError
from domain.messages import (
    Envelope,
    ProvisioningRequested,
    SyncCommand,
    SyncCompleted,
    SyncFailed,
    SyncHeld,
    SyncRequested,
)
from domain.policy import Policy
from tests.fakes import (
    FakeServicesManager,
    FakeShareFile,
    employee,
    fixed_stamper,
    sm_user,
    transient,
)


@pytest.fixture
def sm() -> FakeServicesManager:
    fake = FakeServicesManager()
    fake.add_customer(
        "c1",
        [
            sm_user("u1", "Ann@Acme.example", "provisioned"),
            sm_user("u2", "bob@acme.example"),
            sm_user("u3", "gone@acme.example", "provisioned"),
        ],
    )
    return fake


@pytest.fixture
def sharefile() -> FakeShareFile:
    fake = FakeShareFile()
    fake.set_employees(
        "c1", [employee("s1", "ann@acme.example"), employee("s2", "BOB@acme.example")]
    )
    return fake


def handler(
    sm: FakeServicesManager, sharefile: FakeShareFile, policy: Policy | None = None
) -> SyncHandler:
    return SyncHandler(sm=sm, sharefile=sharefile, policy=policy or Policy(), stamp=fixed_stamper())


def command(customer: str = "c1", **fields: Any) -> Envelope[SyncCommand]:
    return fixed_stamper()(
        SyncCommand(customer_id=customer, run_id="run-1", **fields), correlation_id="run-1"
    )


def test_a_drifted_customer_gets_one_bulk_request_and_a_completed_report(sm, sharefile) -> None:
    outputs = handler(sm, sharefile).handle(command())
    request, report = (m.payload for m in outputs)
    assert isinstance(request, ProvisioningRequested)
    assert [(i.user_id, i.action.value) for i in request.items] == [
        ("u2", "provision"),
        ("u3", "deprovision"),
    ]
    assert isinstance(report, SyncCompleted)
    assert report.request_ids == (request.request_id,)
    assert {m.correlation_id for m in outputs} == {"run-1"}


def test_dry_run_publishes_the_report_only(sm, sharefile) -> None:
    outputs = handler(sm, sharefile).handle(command(dry_run=True))
    [report] = (m.payload for m in outputs)
    assert isinstance(report, SyncCompleted) and report.dry_run
    assert report.counts["provision"] == 1 and report.request_ids == ()


def test_redelivered_command_produces_the_same_request_id(sm, sharefile) -> None:
    first = handler(sm, sharefile).handle(command())[0].payload
    again = handler(sm, sharefile).handle(command())[0].payload
    assert first.request_id == again.request_id


def test_mass_removal_is_held_and_only_provisions_are_requested(sm, sharefile) -> None:
    policy = Policy.model_validate({"guard": {"max_deprovision": 0}})
    outputs = handler(sm, sharefile, policy).handle(command())
    request, report = (m.payload for m in outputs)
    assert [i.action.value for i in request.items] == ["provision"]
    assert isinstance(report, SyncHeld)
    assert [h.user_id for h in report.held] == ["u3"]


def test_an_approved_plan_releases_its_held_removals(sm, sharefile) -> None:
    policy = Policy.model_validate({"guard": {"max_deprovision": 0}})
    held = handler(sm, sharefile, policy).handle(command())[-1].payload
    outputs = handler(sm, sharefile, policy).handle(command(approved_plan_id=held.plan_id))
    request, report = (m.payload for m in outputs)
    assert [i.user_id for i in request.items] == ["u2", "u3"]
    assert isinstance(report, SyncCompleted) and report.approved


def test_sync_requested_by_another_system_runs_under_its_own_event_run_id(sm, sharefile) -> None:
    event = fixed_stamper()(SyncRequested(customer_id="c1", source="crm"), correlation_id="crm-7")
    outputs = handler(sm, sharefile).handle(event)
    assert {m.correlation_id for m in outputs} == {f"event-{event.message_id}"}
    assert isinstance(outputs[-1].payload, SyncCompleted)


def test_customer_without_sharefile_enabled_fails_permanently(sm, sharefile) -> None:
    sm.add_customer("c2", enabled=False)
    with pytest.raises(PermanentError, match="not enabled"):
        handler(sm, sharefile).handle(command("c2"))


def test_transient_sharefile_failure_propagates_for_the_runner_to_retry(sm, sharefile) -> None:
    sharefile.failures["sd-c1"] = transient("c1")
    with pytest.raises(Exception, match="503"):
        handler(sm, sharefile).handle(command())


def test_giving_up_reports_sync_failed_with_the_error(sm, sharefile) -> None:
    outputs = handler(sm, sharefile).on_give_up(command(), transient("c1"))
    [failed] = (m.payload for m in outputs)
    assert isinstance(failed, SyncFailed)
    assert failed.customer_id == "c1" and "503" in (failed.error or "")


def test_short_sharefile_feed_holds_every_removal(sm, sharefile) -> None:
    sharefile.declared["sd-c1"] = 10  # the feed announced 10 employees but served 2
    report = handler(sm, sharefile).handle(command())[-1].payload
    assert isinstance(report, SyncHeld)
    assert [r.code.value for r in report.hold_reasons] == ["source_incomplete"]


def test_message_ids_come_from_the_injected_source(sm, sharefile) -> None:
    outputs = handler(sm, sharefile).handle(command())
    assert all(isinstance(m.message_id, UUID) for m in outputs)
    assert len({m.message_id for m in outputs}) == len(outputs)
