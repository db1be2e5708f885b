"""Answers no honest API gives, from a scripted loopback server: each must fail the customer, never
hand the worker a user set that is another account's, another feed's or cut short.

A user set that is wrong in these ways makes employees look absent, and a removal deletes the
user's ShareFile account: every case here once ended in removals (or in a silently short list).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy, new_http_client
from adapters.services_manager import ServicesManagerClient
from adapters.sharefile import ShareFileClient
from consumers.sync_worker import SyncHandler
from domain.errors import PermanentError, TransientError
from domain.messages import ProvisioningRequested, SyncCommand, SyncCompleted
from domain.policy import Policy
from domain.records import Customer
from tests.fakes import FakeServicesManager, fixed_stamper
from tests.fakes import sm_user as fake_sm_user
from tests.scripted_api import Answer, ScriptedApi, Trickle, scripted_api

CREDENTIALS = {"client_id": "cid", "client_secret": "secret", "username": "svc@x", "password": "pw"}
FAST = RetryPolicy(attempts=2, total_seconds=2.0, initial_backoff_s=0.01, max_backoff_s=0.02)
ACME = Customer(id="cust-acme", sharefile_enabled=True, subdomain="acme")


def token_answer(**extra: Any) -> dict[str, Any]:
    return {
        "access_token": "tok",
        "refresh_token": "ref",
        "token_type": "bearer",
        "expires_in": 28800,
        **extra,
    }


def contact(number: int) -> dict[str, Any]:
    return {"Id": f"sf-{number}", "Email": f"user{number}@acme.example", "IsDisabled": False}


def sm_user(number: int) -> dict[str, Any]:
    return {
        "id": f"u-{number}",
        "email": f"user{number}@acme.example",
        "sharefile": {"state": "provisioned", "updated_at": "2026-11-20T10:00:00Z"},
    }


@contextmanager
def sharefile(api: ScriptedApi) -> Iterator[ShareFileClient]:
    with new_http_client(timeout_s=5.0) as http:
        yield ShareFileClient(
            CredentialStore.from_mapping({"*": CREDENTIALS}),
            token_url_template=api.base_url + "/{subdomain}/oauth/token",
            api_url_template=api.base_url + "/{subdomain}/sf/v3/",
            http=http,
            retry=FAST,
        )


@contextmanager
def services_manager(api: ScriptedApi) -> Iterator[ServicesManagerClient]:
    with new_http_client(timeout_s=5.0) as http:
        yield ServicesManagerClient(api.base_url + "/api/v1", "sm-token", http=http, retry=FAST)


# -- ShareFile --------------------------------------------------------------------------------


def test_credentials_that_log_into_another_account_fail_the_customer() -> None:
    # A shared "*" credentials entry, say: the token is another account's, and so would be the
    # employees; every user of this customer would look absent.
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer(subdomain="bigcorp", apicp="sf-api.com")
        return 200, {"odata.count": 1, "value": [contact(1)]}

    with scripted_api(route) as api, sharefile(api) as client:
        with pytest.raises(PermanentError, match="log into the ShareFile account 'bigcorp'"):
            list(client.employees(ACME))
        assert api.paths("/acme/sf/v3") == []  # no feed was read


def test_a_token_answer_naming_the_same_account_in_other_case_is_fine() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer(subdomain="ACME")
        return 200, {"odata.count": 1, "value": [contact(1)]}

    with scripted_api(route) as api, sharefile(api) as client:
        assert [u.id for u in client.employees(ACME)] == ["sf-1"]


@pytest.mark.parametrize(
    "next_link",
    [
        "/acme/sf/v3/Accounts/Clients?$skip=1",  # the client users, taken for employees
        "/other/sf/v3/Accounts/Employees?$skip=1",  # another account's feed, with our token
    ],
)
def test_a_next_link_to_another_feed_fails_the_customer(next_link: str) -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        if "$skip" not in path:
            return 200, {"odata.count": 2, "value": [contact(1)], "odata.nextLink": next_link}
        return 200, {"value": [contact(2)]}

    with scripted_api(route) as api, sharefile(api) as client:
        with pytest.raises(PermanentError, match=r"odata\.nextLink leaves the Accounts/Employees"):
            list(client.employees(ACME))
        assert len(api.paths("/")) == 2  # the token and the first page; the link not followed


def test_a_next_link_within_the_feed_is_followed() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        if "$skip" not in path:
            nxt = "/acme/sf/v3/accounts/employees/?$skip=1"  # case and slash may differ
            return 200, {"odata.count": 2, "value": [contact(1)], "odata.nextLink": nxt}
        return 200, {"value": [contact(2)]}

    with scripted_api(route) as api, sharefile(api) as client:
        assert [u.id for u in client.employees(ACME)] == ["sf-1", "sf-2"]


# -- Services Manager -------------------------------------------------------------------------


def test_another_customers_record_for_a_customer_fails_it() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        record = {"id": "cust-big", "sharefile": {"enabled": True, "subdomain": "big"}}
        return 200, record

    with (
        scripted_api(route) as api,
        services_manager(api) as client,
        pytest.raises(PermanentError, match="asked for customer 'cust-acme', got 'cust-big'"),
    ):
        client.get_customer("cust-acme")


@pytest.mark.parametrize("cursor_key", ["nextCursor", None])
def test_a_users_page_without_next_cursor_fails_instead_of_ending_the_list(
    cursor_key: str | None,
) -> None:
    # The contract always sends next_cursor (null on the last page). Without it (a renamed key),
    # the list ended after the first page and the sync went on with a part of the users.
    def route(method: str, path: str, body: bytes) -> Answer:
        cursor = parse_qs(urlparse(path).query).get("cursor", ["0"])[0]
        page: dict[str, Any] = {"items": [sm_user(int(cursor))]}
        if cursor_key is not None:
            page[cursor_key] = str(int(cursor) + 1) if cursor == "0" else None
        return 200, page

    with (
        scripted_api(route) as api,
        services_manager(api) as client,
        pytest.raises(PermanentError, match="has no 'next_cursor'"),
    ):
        list(client.list_users("cust-acme"))


def test_a_users_page_with_a_null_next_cursor_ends_the_list() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        return 200, json.loads('{"items": [], "next_cursor": null}')

    with scripted_api(route) as api, services_manager(api) as client:
        assert list(client.list_users("cust-acme")) == []


# -- an account that changes while its pages are read ----------------------------------------


class ChangingAccount:
    """Employees e1..e4 in pages of two by $skip; after the first page is served, e1 leaves and e5
    joins: the second page of that read is e4, e5, and e3 slides onto the page already read."""

    def __init__(self) -> None:
        self.employees = [contact(n) for n in (1, 2, 3, 4)]
        self.pages_served = 0

    def route(self, method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        skip = int(parse_qs(urlparse(path).query).get("$skip", ["0"])[0])
        page: dict[str, Any] = {
            "odata.count": len(self.employees),
            "value": self.employees[skip : skip + 2],
        }
        if skip + 2 < len(self.employees):
            page["odata.nextLink"] = f"/sd-acme/sf/v3/Accounts/Employees?$skip={skip + 2}"
        self.pages_served += 1
        if self.pages_served == 1:
            self.employees = [contact(n) for n in (2, 3, 4, 5)]
        return 200, page


def test_an_employee_missed_by_pages_read_while_the_account_changed_is_not_removed() -> None:
    # The first read lists e1, e2, e4, e5: four users as declared, none twice, and e3 missing.
    # Planned from it alone, u3 (an active employee) would be removed as absent from ShareFile.
    sm = FakeServicesManager()
    sm.add_customer(
        "acme",
        [fake_sm_user(f"u{n}", f"user{n}@acme.example", "provisioned") for n in (1, 2, 3, 4)],
    )
    account = ChangingAccount()
    with scripted_api(account.route) as api, sharefile(api) as client:
        handler = SyncHandler(sm=sm, sharefile=client, policy=Policy(), stamp=fixed_stamper())
        command = fixed_stamper()(SyncCommand(customer_id="acme", run_id="r1"), correlation_id="r1")
        outputs = [m.payload for m in handler.handle(command)]
        assert account.pages_served == 4  # both reads: the account changed during the first

    [report] = [p for p in outputs if isinstance(p, SyncCompleted)]
    assert [i.user_id for i in report.deprovision] == []  # not u3; u1 leaves on the next run
    assert not any(isinstance(p, ProvisioningRequested) for p in outputs)


def test_a_removal_as_absent_that_a_second_read_confirms_goes_out() -> None:
    sm = FakeServicesManager()
    users = [fake_sm_user(f"u{n}", f"user{n}@acme.example", "provisioned") for n in (1, 2, 3, 4, 9)]
    sm.add_customer("acme", users)

    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        skip = int(parse_qs(urlparse(path).query).get("$skip", ["0"])[0])
        page: dict[str, Any] = {"odata.count": 4, "value": [contact(1 + skip), contact(2 + skip)]}
        if skip == 0:
            page["odata.nextLink"] = "/sd-acme/sf/v3/Accounts/Employees?$skip=2"
        return 200, page

    with scripted_api(route) as api, sharefile(api) as client:
        handler = SyncHandler(sm=sm, sharefile=client, policy=Policy(), stamp=fixed_stamper())
        command = fixed_stamper()(SyncCommand(customer_id="acme", run_id="r1"), correlation_id="r1")
        outputs = [m.payload for m in handler.handle(command)]
        assert len(api.paths("/sd-acme/sf/v3")) == 4  # read twice: a removal as absent was planned

    [request] = [p for p in outputs if isinstance(p, ProvisioningRequested)]
    assert [(i.user_id, i.action.value) for i in request.items] == [("u9", "deprovision")]


def second_read(pages: list[list[dict[str, Any]]], known: set[str]) -> list[str]:
    """The ids a read of these pages yields with `known` (a second read)."""

    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        number = int(parse_qs(urlparse(path).query).get("page", ["0"])[0])
        page: dict[str, Any] = {"value": pages[number]}
        if number + 1 < len(pages):
            page["odata.nextLink"] = f"/acme/sf/v3/Accounts/Employees?page={number + 1}"
        return 200, page

    with scripted_api(route) as api, sharefile(api) as client:
        feed = client.employees(ACME, known=known)
        ids = [user.id for user in feed]
        assert feed.received == sum(map(len, pages))
        return ids


def test_a_user_new_to_a_second_read_is_checked_as_on_a_first() -> None:
    broken = {**contact(2), "IsDisabled": "maybe"}
    with pytest.raises(PermanentError, match=r"item #1 \(page 1\): IsDisabled"):
        second_read([[contact(1), broken]], known={"sf-1"})


def test_a_page_whose_ids_cannot_be_read_fails_a_second_read_as_it_fails_a_first() -> None:
    no_id = {"Email": "user2@acme.example"}
    with pytest.raises(PermanentError, match=r"item #1 \(page 1\): Id"):
        second_read([[contact(1), no_id]], known={"sf-1", "sf-2"})


def test_a_known_user_is_not_checked_again_by_a_second_read() -> None:
    # Only its id counts there: it is present, whatever else its second listing says.
    listed_again = {**contact(1), "IsDisabled": "maybe"}
    assert second_read([[listed_again], [contact(2)]], known={"sf-1"}) == ["sf-2"]


def test_pages_of_known_users_are_not_empty_pages() -> None:
    pages = [[contact(n)] for n in range(1, 9)]  # more than MAX_EMPTY_PAGES in a row
    assert second_read(pages, known={f"sf-{n}" for n in range(1, 9)}) == []


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        (
            "http://elsewhere.example/acme/sf/v3/Accounts/Employees?page=1",
            "leaves the account's API",
        ),
        ("/acme/sf/v3/Accounts/Clients?page=1", "leaves the Accounts/Employees feed"),
    ],
)
def test_a_page_of_known_users_is_held_to_its_links_as_any_page(link: str, problem: str) -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        return 200, {"value": [contact(1)], "odata.nextLink": link}

    with (
        scripted_api(route) as api,
        sharefile(api) as client,
        pytest.raises(PermanentError, match=problem),
    ):
        list(client.employees(ACME, known={"sf-1"}))
    assert len(api.paths("/acme/sf/v3")) == 1  # the token never went to the link


def test_a_second_read_of_known_users_stops_past_its_count_as_a_first_read_does() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        n = int(parse_qs(urlparse(path).query).get("n", ["0"])[0])
        return 200, {"odata.count": 1, "value": [contact(1)], "odata.nextLink": f"?n={n + 1}"}

    with (
        scripted_api(route) as api,
        sharefile(api) as client,
        pytest.raises(PermanentError, match=r"still given after page 3 .*odata\.count 1"),
    ):
        feed = client.employees(ACME, known={"sf-1"})
        list(feed)
    assert feed.declared_count == 1


# -- lists that never end ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [None, 3])
def test_a_feed_whose_next_link_changes_forever_fails_after_a_few_pages(count: int | None) -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        n = int(parse_qs(urlparse(path).query).get("n", ["0"])[0])
        page: dict[str, Any] = {"value": [], "odata.nextLink": f"?$skip=0&n={n + 1}"}
        if n == 0:
            page.update({"value": [contact(1)], "odata.count": count})
        return 200, page

    with (
        scripted_api(route) as api,
        sharefile(api) as client,
        pytest.raises(PermanentError, match=r"odata\.nextLink still given after page"),
    ):
        list(client.employees(ACME))
    assert len(api.paths("/acme/sf/v3")) <= 6


def test_a_users_list_whose_cursor_changes_forever_fails_after_a_few_empty_pages() -> None:
    def route(method: str, path: str, body: bytes) -> Answer:
        cursor = int(parse_qs(urlparse(path).query).get("cursor", ["0"])[0])
        return 200, {"items": [sm_user(1)] if cursor == 0 else [], "next_cursor": str(cursor + 1)}

    with (
        scripted_api(route) as api,
        services_manager(api) as client,
        pytest.raises(PermanentError, match="5 empty pages in a row"),
    ):
        list(client.list_users("cust-acme"))
    assert len(api.requests) == 6


def test_a_null_annotation_in_one_odata_spelling_does_not_hide_the_other() -> None:
    # {"odata.nextLink": null, "@odata.nextLink": "..."} ended the feed after its first page.
    def route(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/oauth/token"):
            return 200, token_answer()
        if "$skip" not in path:
            nxt = "/acme/sf/v3/Accounts/Employees?$skip=1"
            page = {"odata.count": None, "@odata.count": 2, "value": [contact(1)]}
            return 200, {**page, "odata.nextLink": None, "@odata.nextLink": nxt}
        return 200, {"value": [contact(2)]}

    with scripted_api(route) as api, sharefile(api) as client:
        feed = client.employees(ACME)
        assert [u.id for u in feed] == ["sf-1", "sf-2"]
        assert feed.declared_count == 2


# -- an answer that trickles in ---------------------------------------------------------------


def test_an_answer_that_trickles_in_times_out_within_the_read_timeout() -> None:
    # Each byte came well within the read timeout, so no read ever timed out: the call (and the
    # scheduler's or a worker's thread) waited as long as the server liked.
    body = json.dumps({"items": [sm_user(n) for n in range(3)], "next_cursor": None}).encode()

    def route(method: str, path: str, body_in: bytes) -> Answer:
        return 200, Trickle(body, every_s=0.1, step=10)

    with scripted_api(route) as api, new_http_client(timeout_s=0.5) as http:
        client = ServicesManagerClient(
            api.base_url + "/api/v1",
            "sm-token",
            http=http,
            retry=RetryPolicy(attempts=1, total_seconds=1.0),
        )
        started = time.monotonic()
        with pytest.raises(TransientError, match=r"(?i)timed out|timeout"):
            list(client.list_users("cust-acme"))
        assert time.monotonic() - started < 2.0  # the whole answer takes about 4 s


def test_an_answer_that_arrives_in_pieces_within_the_timeout_is_read_whole() -> None:
    body = json.dumps({"items": [sm_user(n) for n in range(50)], "next_cursor": None}).encode()

    def route(method: str, path: str, body_in: bytes) -> Answer:
        return 200, Trickle(body, every_s=0.001, step=700)

    with scripted_api(route) as api, services_manager(api) as client:
        assert [u.id for u in client.list_users("cust-acme")] == [f"u-{n}" for n in range(50)]
