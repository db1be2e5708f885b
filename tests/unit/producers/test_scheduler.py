"""The scheduler publishes one sync.command per enabled customer, in confirmed batches."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from adapters.broker import Outgoing
from domain.errors import PermanentError, TransientError
from domain.messages import decode
from domain.records import Customer
from producers import scheduler as scheduler_module
from producers.scheduler import Scheduler, request_sync
from tests.fakes import FakeServicesManager, fixed_stamper


class RecordingBroker:
    """Records each confirmed batch; fails the first `failures` publishes."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[Outgoing]] = []
        self.failures = failures

    def publish(self, messages: Sequence[Outgoing]) -> None:
        if self.failures:
            self.failures -= 1
            raise TransientError("connection lost", call="publish")
        self.batches.append(list(messages))


def fleet(n: int, disabled: int = 0) -> FakeServicesManager:
    sm = FakeServicesManager()
    for i in range(n):
        sm.add_customer(f"c{i:05d}", enabled=i >= disabled)
    return sm


def scheduler(sm: FakeServicesManager, broker: RecordingBroker) -> Scheduler:
    return Scheduler(sm=sm, broker=broker, stamp=fixed_stamper(), new_run_id=lambda: "run-1")  # type: ignore[arg-type]


def test_one_command_per_enabled_customer_with_one_shared_run_id() -> None:
    broker = RecordingBroker()
    run = scheduler(fleet(5, disabled=2), broker).run_once()
    commands = [decode(m.body) for batch in broker.batches for m in batch]
    assert [c.payload.customer_id for c in commands] == ["c00002", "c00003", "c00004"]
    assert {c.payload.run_id for c in commands} == {"run-1"} == {c.correlation_id for c in commands}
    assert run.customer_ids == ("c00002", "c00003", "c00004")


def test_many_customers_are_confirmed_in_batches_not_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "PUBLISH_BATCH", 1000)
    broker = RecordingBroker()
    scheduler(fleet(2500), broker).run_once()
    assert [len(b) for b in broker.batches] == [1000, 1000, 500]


def test_given_customers_and_dry_run_are_carried_in_the_commands() -> None:
    broker = RecordingBroker()
    scheduler(fleet(3), broker).run_once(customer_ids=["c00001", "c00001"], dry_run=True)
    [[message]] = broker.batches
    command = decode(message.body).payload
    assert command.customer_id == "c00001" and command.dry_run


def test_a_batch_that_fails_to_confirm_is_published_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "PUBLISH_MAX_WAIT_S", 0.01)
    broker = RecordingBroker(failures=2)
    scheduler(fleet(3), broker).run_once()
    assert len(broker.batches) == 1 and len(broker.batches[0]) == 3


def test_request_sync_publishes_a_sync_requested_event() -> None:
    broker = RecordingBroker()
    request_sync(broker, fixed_stamper(), customer_id="c7", source="crm", reason="user added")  # type: ignore[arg-type]
    event = decode(broker.batches[0][0].body)
    assert event.type == "sync.requested" and event.payload.customer_id == "c7"
    # The run id the worker gives it, as every message of that run carries.
    assert event.correlation_id == f"event-{event.message_id}"
    assert broker.batches[0][0].correlation_id == event.correlation_id


def test_the_interval_loop_goes_on_after_a_run_fails_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class RefusingOnce(FakeServicesManager):
        calls = 0

        def list_customers(self) -> Iterator[Customer]:
            RefusingOnce.calls += 1
            if RefusingOnce.calls == 1:
                raise PermanentError("HTTP 401 from Services Manager", call="list_customers")
            return super().list_customers()

    sm = RefusingOnce()
    sm.add_customer("c00001")
    broker = RecordingBroker()
    stop = threading.Event()
    loop = threading.Thread(target=scheduler(sm, broker).run_every, args=(0.01, stop), daemon=True)
    loop.start()
    try:
        for _ in range(500):
            if broker.batches:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        loop.join(5)
    assert broker.batches, "no run after the failed one"
    assert "scheduled run failed, next one in 0s" in caplog.text
    assert "HTTP 401 from Services Manager" in caplog.text


def test_a_stop_while_listing_customers_publishes_nothing() -> None:
    # A SIGTERM used to wait for the whole listing (minutes, for a slow SM) and publish it all.
    stop = threading.Event()
    sm = fleet(5)
    listed = sm.list_customers

    def list_then_stop() -> Iterator[Customer]:
        for number, customer in enumerate(listed()):
            if number == 2:
                stop.set()
            yield customer

    sm.list_customers = list_then_stop  # type: ignore[method-assign]
    broker = RecordingBroker()
    run = scheduler(sm, broker).run_once(stop=stop)
    assert broker.batches == [] and run.customer_ids == ()


def test_a_stop_between_batches_publishes_no_further_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "PUBLISH_BATCH", 2)
    stop = threading.Event()

    class StoppingBroker(RecordingBroker):
        def publish(self, messages: Sequence[Outgoing]) -> None:
            super().publish(messages)
            stop.set()

    broker = StoppingBroker()
    run = scheduler(fleet(5), broker).run_once(stop=stop)
    assert [len(b) for b in broker.batches] == [2]
    assert run.customer_ids == ("c00000", "c00001")


def test_a_customer_listed_twice_gets_one_command() -> None:
    sm = fleet(3)
    listed = sm.list_customers
    sm.list_customers = lambda: iter([*listed(), *listed()])  # type: ignore[method-assign]
    broker = RecordingBroker()
    run = scheduler(sm, broker).run_once()
    assert run.customer_ids == ("c00000", "c00001", "c00002")
    assert sum(len(b) for b in broker.batches) == 3
