"""An empty, short or broken answer from either API never deprovisions anyone, and says why."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy, new_http_client
from adapters.memory import MemoryBroker
from adapters.services_manager import ServicesManagerClient
from adapters.sharefile import ShareFileClient
from adapters.topology import REASON_HEADER, Topology
from consumers.run_tracker import RunResult
from consumers.sync_worker import SyncHandler
from domain.errors import PermanentError, SfsyncError
from domain.messages import SyncCommand
from domain.policy import HoldCode, Policy
from domain.records import Customer
from domain.report import Outcome, SyncReport
from sfsync.bootstrap import build_topology
from sfsync.oneshot import sync_once
from simulators import Faults, Scenario, ScenarioCustomer, SimulatorServers
from tests.e2e.conftest import no_stray_settings, settings_for  # noqa: F401
from tests.fakes import FakeShareFile, employee, fixed_stamper

EMPTY, TRUNCATED, MALFORMED, HEALTHY = "cust-empty", "cust-truncated", "cust-malformed", "cust-ok"
STAYING = 5  # provisioned users who are still ShareFile employees
# Plus one provisioned user who has left ShareFile: the one removal a healthy feed plans.


def customer(customer_id: str) -> ScenarioCustomer:
    subdomain = customer_id.removeprefix("cust-")
    people = [(f"{customer_id}-u{n}", f"user{n}@{subdomain}.example") for n in range(STAYING + 1)]
    return ScenarioCustomer(
        id=customer_id,
        name=customer_id.title(),
        subdomain=subdomain,
        sm_users=[
            {
                "id": user_id,
                "username": email,
                "email": email,
                "display_name": f"User {user_id}",
                "enabled": True,
                "sharefile": {"state": "provisioned", "updated_at": "2026-01-05T09:00:00Z"},
            }
            for user_id, email in people
        ],
        sharefile_employees=[
            {
                "Id": f"sf-{user_id}",
                "Email": email,
                "FirstName": "User",
                "LastName": user_id,
                "IsDisabled": False,
                "odata.type": "ShareFile.Api.Models.Contact",
            }
            for user_id, email in people[:STAYING]
        ],
    )


SCENARIO = Scenario(customers=[customer(c) for c in (EMPTY, TRUNCATED, MALFORMED, HEALTHY)])
LEAVER = {c.id: c.sm_users[STAYING]["id"] for c in SCENARIO.customers}
BEFORE = {c.id: {u["id"]: "provisioned" for u in c.sm_users} for c in SCENARIO.customers}
FAULTS = Faults(
    empty_customers=frozenset({EMPTY}),
    truncated_customers=frozenset({TRUNCATED}),
    malformed_customers=frozenset({MALFORMED}),
)


@pytest.fixture
def sims() -> Iterator[SimulatorServers]:
    # Two employees a page: the feeds span several pages, as real ones do.
    with SimulatorServers(SCENARIO, sharefile_faults=FAULTS, sharefile_page_size=2) as servers:
        yield servers


@dataclass
class Cycle:
    """What one sync cycle over SCENARIO reported, requested, changed and parked."""

    result: RunResult
    submissions: list[dict[str, Any]]
    states: dict[str, dict[str, str]]
    parked: list[tuple[bytes, dict[str, Any]]]

    def report(self, customer_id: str) -> SyncReport:
        return self.result.reports[customer_id]


@pytest.fixture
def memory_cycle(sims: SimulatorServers, tmp_path: Path) -> Cycle:
    settings = settings_for(sims, tmp_path)
    names = build_topology(settings)
    broker = MemoryBroker(names)
    broker.start()
    try:
        result = sync_once(settings, timeout_s=60, overrides={"broker": broker})
        parked = broker.messages(names.dead_queue(names.sync_queue))
    finally:
        broker.close()
    return Cycle(result, sims.submissions(), sims.sm_states(), parked)


def assert_untouched(cycle: Cycle, customer_id: str) -> None:
    """Nothing was asked of Services Manager for this customer, and nothing changed there."""
    assert [s for s in cycle.submissions if s["customer_id"] == customer_id] == []
    assert cycle.states[customer_id] == BEFORE[customer_id]
    report = cycle.report(customer_id)
    assert report.deprovision == () and report.request_ids == ()


def assert_held(cycle: Cycle, customer_id: str, code: HoldCode, held: int) -> None:
    report = cycle.report(customer_id)
    assert report.outcome is Outcome.HELD
    assert code in {reason.code for reason in report.hold_reasons}
    assert len(report.held) == held and LEAVER[customer_id] in {i.user_id for i in report.held}
    assert_untouched(cycle, customer_id)


def assert_failed_as_malformed(cycle: Cycle, customer_id: str) -> None:
    report = cycle.report(customer_id)
    assert report.outcome is Outcome.FAILED
    assert "malformed response" in (report.error or "")
    assert "Accounts/Employees" in (report.error or "")
    assert_untouched(cycle, customer_id)
    [headers] = [h for body, h in cycle.parked if customer_id.encode() in body]
    assert "permanent error" in headers[REASON_HEADER]
    assert "malformed response" in headers[REASON_HEADER]


def assert_leaver_removed(cycle: Cycle, customer_id: str) -> None:
    """The control: the same customer, healthy, loses exactly its leaver."""
    report = cycle.report(customer_id)
    assert report.outcome is Outcome.COMPLETED
    assert [i.user_id for i in report.deprovision] == [LEAVER[customer_id]]
    [submission] = [s for s in cycle.submissions if s["customer_id"] == customer_id]
    assert submission["items"] == [{"user_id": LEAVER[customer_id], "action": "deprovision"}]
    after = {**BEFORE[customer_id], LEAVER[customer_id]: "not_provisioned"}
    assert cycle.states[customer_id] == after


def test_a_healthy_feed_of_the_same_shape_deprovisions_the_leaver(memory_cycle: Cycle) -> None:
    assert_leaver_removed(memory_cycle, HEALTHY)


def test_an_empty_employee_feed_holds_every_removal_as_source_empty(memory_cycle: Cycle) -> None:
    assert_held(memory_cycle, EMPTY, HoldCode.SOURCE_EMPTY, held=STAYING + 1)


def test_a_truncated_employee_feed_holds_the_removal_as_source_incomplete(
    memory_cycle: Cycle,
) -> None:
    assert_held(memory_cycle, TRUNCATED, HoldCode.SOURCE_INCOMPLETE, held=1)
    report = memory_cycle.report(TRUNCATED)
    assert report.sharefile_declared is not None and report.sharefile_declared > STAYING


def test_a_malformed_employee_feed_fails_the_customer_and_removes_nobody(
    memory_cycle: Cycle,
) -> None:
    assert_failed_as_malformed(memory_cycle, MALFORMED)


def dead_messages(amqp_url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    found: list[tuple[bytes, dict[str, Any]]] = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((body, dict(properties.headers or {})))
    finally:
        connection.close()


@pytest.mark.broker
def test_through_rabbitmq_broken_feeds_remove_nobody_and_say_why(
    sims: SimulatorServers, tmp_path: Path, amqp_url: str, topology: Topology
) -> None:
    settings = settings_for(
        sims, tmp_path, SFSYNC_BROKER_URL=amqp_url, SFSYNC_PREFIX=topology.prefix
    )
    names = build_topology(settings)
    result = sync_once(settings, timeout_s=60)
    parked = dead_messages(amqp_url, names.dead_queue(names.sync_queue))
    cycle = Cycle(result, sims.submissions(), sims.sm_states(), parked)
    assert sorted(result.reports) == sorted(c.id for c in SCENARIO.customers)
    assert_held(cycle, EMPTY, HoldCode.SOURCE_EMPTY, held=STAYING + 1)
    assert_held(cycle, TRUNCATED, HoldCode.SOURCE_INCOMPLETE, held=1)
    assert_failed_as_malformed(cycle, MALFORMED)
    assert_leaver_removed(cycle, HEALTHY)
    assert len(parked) == 1


# -- a malformed Services Manager users page (the simulator cannot serve one) ------------------

SM_BASE = "http://sm.test/api/v1"
USERS_PATH = "/api/v1/customers/cust-1/users"
A_USER = {"id": "u-1", "email": "u1@x.example", "sharefile": {"state": "provisioned"}}


def sm_client(pages: list[bytes]) -> ServicesManagerClient:
    """A client whose users endpoint answers 200 with each of `pages` in turn."""
    answers = iter(pages)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/customers/cust-1":
            body = {"id": "cust-1", "sharefile": {"enabled": True, "subdomain": "one"}}
            return httpx.Response(200, json=body)
        assert request.url.path == USERS_PATH
        return httpx.Response(
            200, content=next(answers), headers={"Content-Type": "application/json"}
        )

    http = new_http_client(transport=httpx.MockTransport(handle))
    return ServicesManagerClient(SM_BASE, "sm-token", http=http, retry=RetryPolicy(attempts=1))


def page(items: list[object], next_cursor: object = None) -> bytes:
    return json.dumps({"items": items, "next_cursor": next_cursor}).encode()


MALFORMED_USER_PAGES = {
    "not JSON": [b"<html><body>502 Bad Gateway</body></html>"],
    "empty body": [b""],
    "cut off": [b'{"items": [{"id": "u-1", "sharefile": {"st'],
    "a JSON list": [b"[]"],
    "null": [b"null"],
    "items is null": [b'{"items": null, "next_cursor": null}'],
    "items missing": [b'{"users": [], "next_cursor": null}'],
    "items not a list": [b'{"items": {}, "next_cursor": null}'],
    "cursor not a string": [page([], next_cursor=5)],
    "user without state": [page([{"id": "u-1", "email": "u1@x.example"}])],
    "user not an object": [page(["u-1"])],
    "second page broken": [page([A_USER], next_cursor="c2"), b'{"items": ['],
    "cursor repeats": [page([A_USER], next_cursor="c2"), page([], next_cursor="c2")],
}


@pytest.mark.parametrize("pages", MALFORMED_USER_PAGES.values(), ids=MALFORMED_USER_PAGES.keys())
def test_a_malformed_users_page_is_an_error_not_an_empty_list(pages: list[bytes]) -> None:
    with pytest.raises(PermanentError, match="malformed response") as raised:
        list(sm_client(pages).list_users("cust-1"))
    assert raised.value.customer_id == "cust-1"
    assert raised.value.call == "GET sm users"


def test_an_empty_users_page_is_read_as_no_users() -> None:
    """The contrast: a well-formed empty page is a legitimate "no users"."""
    assert list(sm_client([page([])]).list_users("cust-1")) == []


def test_a_malformed_users_page_fails_the_sync_before_anything_is_planned() -> None:
    sharefile = FakeShareFile()
    sharefile.employees_by_subdomain["one"] = [employee("sf-1", "u1@x.example")]
    handler = SyncHandler(
        sm=sm_client([b'{"items": null}']),
        sharefile=sharefile,
        policy=Policy(),
        stamp=fixed_stamper(),
    )
    command = handler.stamp(SyncCommand(customer_id="cust-1", run_id="r1"), correlation_id="r1")
    with pytest.raises(PermanentError, match="malformed response"):
        handler.handle(command)  # raises: no request, no report
    # ShareFile's feed is read first, in full; the first broken SM page then stops the sync.
    assert sharefile.calls == ["one"]


# -- malformed ShareFile answers the simulator does not serve: JSON of the wrong shape ----------


def sharefile_client(feed: Callable[[httpx.Request], httpx.Response]) -> ShareFileClient:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth/token"):
            token = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
            return httpx.Response(200, json=token)
        return feed(request)

    http = new_http_client(transport=httpx.MockTransport(handle))
    credentials = {"client_id": "c", "client_secret": "s", "username": "u", "password": "p"}
    return ShareFileClient(
        CredentialStore.from_mapping({"*": credentials}),
        token_url_template="http://sf.test/{subdomain}/oauth/token",
        api_url_template="http://sf.test/{subdomain}/sf/v3/",
        http=http,
        retry=RetryPolicy(attempts=1),
    )


MALFORMED_FEEDS: dict[str, bytes] = {
    "no value": b'{"odata.count": 0}',
    "value is null": b'{"value": null, "odata.count": 0}',
    "value not a list": b'{"value": {}, "odata.count": 0}',
    "a JSON list": b"[]",
    "count not a count": b'{"value": [], "odata.count": "many"}',
    "negative count": b'{"value": [], "odata.count": -1}',
    "item without Id": b'{"value": [{"Email": "a@x.example"}]}',
    "item not an object": b'{"value": ["a@x.example"]}',
    "empty body": b"",
}


@pytest.mark.parametrize("body", MALFORMED_FEEDS.values(), ids=MALFORMED_FEEDS.keys())
def test_an_employee_feed_of_the_wrong_shape_is_an_error_not_an_empty_feed(body: bytes) -> None:
    client = sharefile_client(lambda _: httpx.Response(200, content=body))
    feed = client.employees(Customer(id="cust-1", sharefile_enabled=True, subdomain="one"))
    with pytest.raises(PermanentError, match="malformed response") as raised:
        list(feed)
    assert raised.value.customer_id == "cust-1"


# -- a feed that lists employees but none the matcher can use ------------------------------------


def without_addresses(source: ScenarioCustomer) -> ScenarioCustomer:
    """The same customer, but ShareFile's items no longer carry an Email (a renamed field)."""
    return source.model_copy(
        update={
            "sharefile_employees": [
                {k: v for k, v in item.items() if k != "Email"}
                for item in source.sharefile_employees
            ]
        }
    )


def test_a_feed_whose_employees_all_lack_an_address_removes_nobody(tmp_path: Path) -> None:
    scenario = Scenario(customers=[without_addresses(customer("cust-renamed"))])
    with SimulatorServers(scenario, sharefile_page_size=2) as servers:
        result = sync_once(settings_for(servers, tmp_path), timeout_s=60)
        report = result.reports["cust-renamed"]
        assert report.deprovision == ()
        assert servers.submissions() == []
        assert report.outcome is Outcome.HELD
        # Every provisioned user would go: over the ratio as well (taken of at least 20 users).
        assert [r.code.value for r in report.hold_reasons] == [
            "source_unmatchable",
            "deprovision_ratio",
        ]


# -- error answers whose text no header, log line or report can hold ------------------------------

HOSTILE = "bad \udc80 text\x00\n" + "x" * 5000  # a lone surrogate, a NUL, a newline, and long


def sm_error(status: int) -> ServicesManagerClient:
    body = {"error": {"code": "c\udc80" * 200, "message": HOSTILE}}
    text = json.dumps(body)  # escapes the surrogate as \\udc80, as a real server's JSON would

    def handle(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=text.encode(), headers={"Retry-After": "0"})

    http = new_http_client(transport=httpx.MockTransport(handle))
    return ServicesManagerClient(SM_BASE, "sm-token", http=http, retry=RetryPolicy(attempts=1))


def sharefile_error(status: int) -> ShareFileClient:
    body = json.dumps({"code": "c\udc80" * 200, "message": {"lang": "en", "value": HOSTILE}})
    return sharefile_client(lambda _: httpx.Response(status, content=body.encode()))


ERROR_ANSWERS: dict[str, Callable[[], object]] = {
    "sm 400": lambda: list(sm_error(400).list_users("cust-1")),
    "sm 503": lambda: list(sm_error(503).list_users("cust-1")),
    "sharefile 403": lambda: list(
        sharefile_error(403).employees(Customer(id="cust-1", subdomain="one"))
    ),
    "sharefile 429": lambda: list(
        sharefile_error(429).employees(Customer(id="cust-1", subdomain="one"))
    ),
}


@pytest.mark.parametrize("call", ERROR_ANSWERS.values(), ids=ERROR_ANSWERS.keys())
def test_an_error_answer_with_unencodable_text_still_makes_a_report_and_a_parking_header(
    call: Callable[[], object],
) -> None:
    with pytest.raises(SfsyncError) as raised:
        call()
    text = str(raised.value)
    text.encode("utf-8")  # a lone surrogate would raise here, and in pika, and in pydantic
    assert len(text) < 1000
    # The two places the runner puts it: the sync.failed report and the parking header.
    SyncReport.failure(customer_id="cust-1", run_id="r1", dry_run=False, error=text)
    pika.BasicProperties(headers={REASON_HEADER: f"permanent error: {text}"}).encode()
