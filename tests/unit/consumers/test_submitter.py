"""The submitter's handler posts each bulk request once and reports Services Manager's answer."""

from __future__ import annotations

from consumers.submitter import SubmitHandler
from domain.errors import PermanentError
from domain.messages import (
    ProvisioningCompleted,
    ProvisioningFailed,
    ProvisioningItem,
    ProvisioningRequested,
)
from tests.fakes import FakeServicesManager, fixed_stamper

STAMP = fixed_stamper()


def request_message():
    items = (ProvisioningItem(user_id="u1", action="provision", rule="employee_without_service"),)
    payload = ProvisioningRequested(customer_id="c1", run_id="r1", request_id="req-1", items=items)
    return STAMP(payload, correlation_id="r1")


def test_posting_a_request_reports_each_item_answer() -> None:
    sm = FakeServicesManager()
    [answer] = SubmitHandler(sm=sm, stamp=STAMP).handle(request_message())
    assert isinstance(answer.payload, ProvisioningCompleted)
    assert [(i.user_id, i.status) for i in answer.payload.items] == [("u1", "accepted")]
    assert not answer.payload.replayed
    assert len(sm.submitted) == 1


def test_a_redelivered_request_is_answered_from_services_manager_without_acting_twice() -> None:
    sm = FakeServicesManager()
    handler = SubmitHandler(sm=sm, stamp=STAMP)
    handler.handle(request_message())
    [again] = handler.handle(request_message())
    assert again.payload.replayed
    assert len(sm.submitted) == 1


def test_giving_up_reports_provisioning_failed_with_the_items() -> None:
    [failed] = SubmitHandler(sm=FakeServicesManager(), stamp=STAMP).on_give_up(
        request_message(), PermanentError("conflict", status=409)
    )
    assert isinstance(failed.payload, ProvisioningFailed)
    assert failed.payload.items[0].user_id == "u1" and "409" in failed.payload.error
