"""The ShareFile client against an in-memory fake of the API (httpx.MockTransport)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy
from adapters.sharefile import CALL_EMPLOYEES, CALL_TOKEN, ShareFileClient
from domain.errors import PermanentError, TransientError
from domain.records import Customer

CLIENT_SECRET = "sf-cl1ent-secret"
PASSWORD = "sf-pa55word"
ACME = Customer(id="cust-0001", name="Acme", sharefile_enabled=True, subdomain="acme")
GLOBEX = Customer(id="cust-0002", name="Globex", sharefile_enabled=True, subdomain="globex")


def employee(number: int, **overrides: object) -> dict[str, object]:
    item: dict[str, object] = {
        "odata.type": "ShareFile.Api.Models.Contact",
        "Id": f"a1b2c3d4-{number:04d}",
        "url": f"https://acme.sf-api.test/sf/v3/Contacts(a1b2c3d4-{number:04d})",
        "Email": f"Employee{number}@Acme.example",
        "Name": f"Doe, Employee{number}",
        "FirstName": f"Employee{number}",
        "LastName": "Doe",
        "IsConfirmed": True,
        "IsDisabled": False,
    }
    item.update(overrides)
    return item


def sf_error(status: int, code: str, text: str, **headers: str) -> httpx.Response:
    body = {"code": code, "message": {"lang": "en-US", "value": text}}
    return httpx.Response(status, json=body, headers=headers)


@dataclass
class FakeShareFile:
    """Token endpoint on {subdomain}.sharefile.test, API on {subdomain}.sf-api.test."""

    employees: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    clients: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    page_size: int | None = None
    count: Callable[[str, int], int | None] = lambda subdomain, total: total
    lifetime_s: int = 28800
    grants: list[dict[str, str]] = field(default_factory=list)
    api_requests: list[httpx.Request] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)
    valid_refresh: set[str] = field(default_factory=set)
    api_override: Callable[[httpx.Request], httpx.Response | None] | None = None
    token_override: Callable[[httpx.Request], httpx.Response | None] | None = None
    api_delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host.endswith(".sharefile.test"):
            return self._token(request, host.split(".")[0])
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.api_delay_s:
                time.sleep(self.api_delay_s)
            return self._api(request, host.split(".")[0])
        finally:
            with self._lock:
                self.in_flight -= 1

    def expire_tokens(self) -> None:
        self.valid_access.clear()
        self.valid_refresh.clear()

    def _token(self, request: httpx.Request, subdomain: str) -> httpx.Response:
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = dict(parse_qsl(request.content.decode()))
        with self._lock:
            self.grants.append(form)
            number = len(self.grants)
        if self.token_override is not None:
            answer = self.token_override(request)
            if answer is not None:
                return answer
        if form["client_secret"] != CLIENT_SECRET:
            return httpx.Response(400, json={"error": "invalid_client"})
        if form["grant_type"] == "password" and form["password"] != PASSWORD:
            return httpx.Response(
                400, json={"error": "invalid_grant", "error_description": "bad password"}
            )
        if (
            form["grant_type"] == "refresh_token"
            and form["refresh_token"] not in self.valid_refresh
        ):
            return httpx.Response(
                400, json={"error": "invalid_grant", "error_description": "refresh expired"}
            )
        access, refresh = f"access-{subdomain}-{number}", f"refresh-{subdomain}-{number}"
        with self._lock:
            self.valid_access.add(access)
            self.valid_refresh.add(refresh)
        return httpx.Response(
            200,
            json={
                "access_token": access,
                "refresh_token": refresh,
                "token_type": "bearer",
                "expires_in": self.lifetime_s,
                "subdomain": subdomain,
                "apicp": "sf-api.test",
                "appcp": "sharefile.test",
            },
        )

    def _api(self, request: httpx.Request, subdomain: str) -> httpx.Response:
        with self._lock:
            self.api_requests.append(request)
        if self.api_override is not None:
            answer = self.api_override(request)
            if answer is not None:
                return answer
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid_access:
            return sf_error(401, "Unauthorized", "token expired or invalid")
        path = request.url.path
        source = {
            "/sf/v3/Accounts/Employees": self.employees,
            "/sf/v3/Accounts/Clients": self.clients,
        }.get(path)
        if source is None or subdomain not in source:
            return sf_error(404, "NotFound", f"no such resource {path}")
        rows = source[subdomain]
        skip = int(request.url.params.get("$skip", "0"))
        end = len(rows) if self.page_size is None else skip + self.page_size
        body: dict[str, object] = {
            "odata.metadata": f"https://{subdomain}.sf-api.test/sf/v3/$metadata#Contacts",
            "value": rows[skip:end],
        }
        count = self.count(subdomain, len(rows))
        if count is not None:
            body["odata.count"] = count
        if end < len(rows):
            body["odata.nextLink"] = f"https://{subdomain}.sf-api.test{path}?$skip={end}"
        return httpx.Response(200, json=body)


def credentials() -> CredentialStore:
    return CredentialStore.from_mapping(
        {
            "*": {
                "client_id": "sfsync",
                "client_secret": CLIENT_SECRET,
                "username": "svc@provider.example",
                "password": PASSWORD,
            }
        }
    )


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def no_wait_policy(**overrides: Any) -> RetryPolicy:
    settings: dict[str, Any] = {
        "attempts": 3,
        "initial_backoff_s": 0.0,
        "max_backoff_s": 0.0,
        "sleep": lambda _: None,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)


def make_client(fake: FakeShareFile, **kwargs: Any) -> ShareFileClient:
    kwargs.setdefault("retry", no_wait_policy())
    return ShareFileClient(
        kwargs.pop("store", None) or credentials(),
        token_url_template="https://{subdomain}.sharefile.test/oauth/token",
        http=httpx.Client(transport=httpx.MockTransport(fake.handle)),
        **kwargs,
    )


@pytest.fixture
def fake() -> FakeShareFile:
    return FakeShareFile(employees={"acme": [employee(n) for n in range(12)], "globex": []})


def test_password_grant_is_a_form_post_with_secrets_only_in_the_body(fake: FakeShareFile) -> None:
    list(make_client(fake).employees(ACME))
    assert fake.grants == [
        {
            "grant_type": "password",
            "client_id": "sfsync",
            "client_secret": CLIENT_SECRET,
            "username": "svc@provider.example",
            "password": PASSWORD,
        }
    ]
    for request in fake.api_requests:
        assert "access-" not in str(request.url)
        assert request.headers["Authorization"] == "Bearer access-acme-1"


def test_the_api_base_comes_from_the_token_answer(fake: FakeShareFile) -> None:
    list(make_client(fake).employees(ACME))
    url = fake.api_requests[0].url
    assert (url.scheme, url.host, url.path) == (
        "https",
        "acme.sf-api.test",
        "/sf/v3/Accounts/Employees",
    )
    assert url.params["$select"] == "Id,Email,FirstName,LastName,IsDisabled"


def test_an_api_url_template_overrides_the_token_answer(fake: FakeShareFile) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("/oauth/token"):
            return fake.handle(request)
        return httpx.Response(200, json={"value": []})

    client = ShareFileClient(
        credentials(),
        token_url_template="https://{subdomain}.sharefile.test/oauth/token",
        api_url_template="http://127.0.0.1:9/{subdomain}/sf/v3",
        http=httpx.Client(transport=httpx.MockTransport(handler)),
        retry=no_wait_policy(),
    )
    assert list(client.employees(ACME)) == []
    assert seen[-1].startswith("http://127.0.0.1:9/acme/sf/v3/Accounts/Employees")


def test_paging_follows_every_absolute_next_link(fake: FakeShareFile) -> None:
    fake.page_size = 5
    feed = make_client(fake).employees(ACME)
    before_first_page = feed.declared_count
    users = list(feed)
    assert before_first_page is None
    assert [u.id for u in users] == [f"a1b2c3d4-{n:04d}" for n in range(12)]
    assert all(u.is_employee for u in users)
    assert [r.url.params.get("$skip") for r in fake.api_requests] == [None, "5", "10"]
    assert (feed.declared_count, feed.received) == (12, 12)


def test_the_feed_streams_one_page_at_a_time(fake: FakeShareFile) -> None:
    fake.page_size = 5
    stream = iter(make_client(fake).employees(ACME))
    for _ in range(5):
        next(stream)
    assert len(fake.api_requests) == 1


def test_an_unpaged_feed_of_thousands_is_read_whole(fake: FakeShareFile) -> None:
    fake.employees["acme"] = [employee(n) for n in range(5000)]
    feed = make_client(fake).employees(ACME)
    assert sum(1 for _ in feed) == 5000
    assert (feed.declared_count, feed.received) == (5000, 5000)
    assert len(fake.api_requests) == 1


def test_a_short_feed_shows_as_declared_count_above_received(
    fake: FakeShareFile, caplog: pytest.LogCaptureFixture
) -> None:
    fake.page_size = 5
    fake.count = lambda subdomain, total: total + 3
    feed = make_client(fake).employees(ACME)
    list(feed)
    assert (feed.declared_count, feed.received) == (15, 12)
    assert any("announced odata.count 15" in r.getMessage() for r in caplog.records)


def test_a_feed_without_odata_count_declares_none(fake: FakeShareFile) -> None:
    fake.count = lambda subdomain, total: None
    feed = make_client(fake).employees(ACME)
    list(feed)
    assert (feed.declared_count, feed.received) == (None, 12)


def test_a_feed_can_be_iterated_once(fake: FakeShareFile) -> None:
    feed = make_client(fake).employees(ACME)
    list(feed)
    with pytest.raises(RuntimeError):
        iter(feed)


def test_missing_and_null_fields_are_accepted(fake: FakeShareFile) -> None:
    fake.employees["acme"] = [
        {"Id": "no-email"},
        {"Id": "nulls", "Email": None, "IsDisabled": None, "FirstName": None},
        employee(3, IsDisabled=True),
    ]
    users = list(make_client(fake).employees(ACME))
    assert [(u.id, u.email, u.is_disabled) for u in users] == [
        ("no-email", None, False),
        ("nulls", None, False),
        ("a1b2c3d4-0003", "Employee3@Acme.example", True),
    ]


def test_an_item_without_id_is_permanent_and_names_customer_and_index(
    fake: FakeShareFile,
) -> None:
    fake.page_size = 5
    fake.employees["acme"][7] = {"Email": "nobody@acme.example"}
    with pytest.raises(PermanentError) as raised:
        list(make_client(fake).employees(ACME))
    error = raised.value
    assert (error.customer_id, error.call) == ("cust-0001", CALL_EMPLOYEES)
    assert "item #7" in str(error)
    assert "malformed response" in str(error)


def test_clients_are_not_employees(fake: FakeShareFile) -> None:
    fake.clients["acme"] = [employee(100), employee(101)]
    users = list(make_client(fake).clients(ACME))
    assert [u.is_employee for u in users] == [False, False]
    assert fake.api_requests[0].url.path == "/sf/v3/Accounts/Clients"


def test_the_token_is_cached_per_subdomain(fake: FakeShareFile) -> None:
    client = make_client(fake)
    list(client.employees(ACME))
    list(client.employees(ACME))
    list(client.employees(GLOBEX))
    assert [g["grant_type"] for g in fake.grants] == ["password", "password"]


def test_a_token_near_expiry_is_refreshed_with_the_refresh_grant(fake: FakeShareFile) -> None:
    clock = Clock()
    fake.lifetime_s = 3600
    client = make_client(fake, clock=clock, token_refresh_margin_s=300)
    list(client.employees(ACME))
    clock.now = 3299
    list(client.employees(ACME))
    assert len(fake.grants) == 1
    clock.now = 3300
    list(client.employees(ACME))
    assert [g["grant_type"] for g in fake.grants] == ["password", "refresh_token"]
    assert fake.grants[1]["refresh_token"] == "refresh-acme-1"
    assert "password" not in fake.grants[1]
    assert fake.api_requests[-1].headers["Authorization"] == "Bearer access-acme-2"


def test_a_failed_refresh_falls_back_to_the_password_grant(fake: FakeShareFile) -> None:
    clock = Clock()
    client = make_client(fake, clock=clock)
    list(client.employees(ACME))
    fake.valid_refresh.clear()
    clock.now = 1e9
    assert len(list(client.employees(ACME))) == 12
    assert [g["grant_type"] for g in fake.grants] == ["password", "refresh_token", "password"]


def test_a_401_gets_a_new_token_once_and_retries_once(fake: FakeShareFile) -> None:
    client = make_client(fake)
    list(client.employees(ACME))
    fake.expire_tokens()
    assert len(list(client.employees(ACME))) == 12
    assert [g["grant_type"] for g in fake.grants] == ["password", "refresh_token", "password"]


def test_a_second_401_is_permanent(fake: FakeShareFile) -> None:
    fake.api_override = lambda request: sf_error(401, "Unauthorized", "account locked")
    with pytest.raises(PermanentError) as raised:
        list(make_client(fake).employees(ACME))
    assert raised.value.status == 401
    assert "account locked" in str(raised.value)
    assert len(fake.api_requests) == 2
    assert len(fake.grants) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 409])
def test_permanent_statuses_carry_the_sharefile_message(fake: FakeShareFile, status: int) -> None:
    fake.api_override = lambda request: sf_error(status, "Nope", f"ShareFile says {status}")
    with pytest.raises(PermanentError) as raised:
        list(make_client(fake).employees(ACME))
    error = raised.value
    assert (error.status, error.code, error.customer_id, error.call) == (
        status,
        "Nope",
        "cust-0001",
        CALL_EMPLOYEES,
    )
    assert f"ShareFile says {status}" in str(error)
    assert len(fake.api_requests) == 1


def test_a_bad_password_is_permanent_with_the_oauth_error(fake: FakeShareFile) -> None:
    store = CredentialStore.from_mapping(
        {
            "*": {
                "client_id": "sfsync",
                "client_secret": CLIENT_SECRET,
                "username": "u",
                "password": "x",
            }
        }
    )
    with pytest.raises(PermanentError) as raised:
        list(make_client(fake, store=store).employees(ACME))
    assert raised.value.call == CALL_TOKEN
    assert raised.value.code == "invalid_grant"
    assert "bad password" in str(raised.value)


def test_429_with_retry_after_then_success(fake: FakeShareFile) -> None:
    waits: list[float] = []
    throttled: list[bool] = []

    def throttle_once(request: httpx.Request) -> httpx.Response | None:
        if not throttled:
            throttled.append(True)
            return sf_error(429, "TooManyRequests", "curtailed", **{"Retry-After": "2"})
        return None

    fake.api_override = throttle_once
    client = make_client(fake, retry=no_wait_policy(sleep=waits.append))
    assert len(list(client.employees(ACME))) == 12
    assert waits == [2.0]


def test_a_503_burst_that_never_ends_is_transient(fake: FakeShareFile) -> None:
    fake.api_override = lambda request: sf_error(503, "ServiceUnavailable", "maintenance")
    with pytest.raises(TransientError) as raised:
        list(make_client(fake, retry=no_wait_policy(attempts=4)).employees(ACME))
    assert len(fake.api_requests) == 4
    assert raised.value.customer_id == "cust-0001"
    assert "maintenance" in str(raised.value)


def test_a_timeout_is_retried(fake: FakeShareFile) -> None:
    timed_out: list[bool] = []

    def time_out_once(request: httpx.Request) -> httpx.Response | None:
        if not timed_out:
            timed_out.append(True)
            raise httpx.ReadTimeout("read timed out", request=request)
        return None

    fake.api_override = time_out_once
    assert len(list(make_client(fake).employees(ACME))) == 12


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>oops</html>"),
        httpx.Response(200, json=[]),
        httpx.Response(200, json={"odata.count": 3}),
        httpx.Response(200, json={"value": [], "odata.count": "many"}),
        httpx.Response(200, json={"value": [], "odata.nextLink": 7}),
        httpx.Response(200, json={"value": ["not an object"]}),
    ],
)
def test_a_broken_200_is_malformed_never_an_empty_feed(
    fake: FakeShareFile, answer: httpx.Response
) -> None:
    fake.api_override = lambda request: answer
    with pytest.raises(PermanentError, match="malformed response"):
        list(make_client(fake).employees(ACME))


def test_a_next_link_to_another_host_is_refused(fake: FakeShareFile) -> None:
    fake.api_override = lambda request: httpx.Response(
        200, json={"value": [], "odata.nextLink": "https://evil.example/steal"}
    )
    with pytest.raises(PermanentError, match="leaves the account's API"):
        list(make_client(fake).employees(ACME))
    assert len(fake.api_requests) == 1


def test_a_customer_without_subdomain_is_permanent(fake: FakeShareFile) -> None:
    customer = Customer(id="cust-0009", sharefile_enabled=True, subdomain=None)
    with pytest.raises(PermanentError) as raised:
        make_client(fake).employees(customer)
    assert raised.value.customer_id == "cust-0009"


def test_missing_credentials_name_the_customer(fake: FakeShareFile) -> None:
    store = CredentialStore.from_mapping(
        {"other": {"client_id": "c", "client_secret": "s", "username": "u", "password": "p"}}
    )
    with pytest.raises(PermanentError) as raised:
        make_client(fake, store=store).employees(ACME)
    assert raised.value.customer_id == "cust-0001"


def test_threads_share_one_token_and_respect_the_per_account_bound(fake: FakeShareFile) -> None:
    fake.api_delay_s = 0.02
    client = make_client(fake, max_concurrency_per_account=2)
    counts: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            counts.append(sum(1 for _ in client.employees(ACME)))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert counts == [12] * 8
    assert len(fake.grants) == 1
    assert fake.max_in_flight == 2


def test_no_secret_in_reprs_logs_or_errors(
    fake: FakeShareFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.api_override = lambda request: sf_error(
        403, "Forbidden", f"you sent {request.headers['Authorization']} and {PASSWORD}"
    )
    client = make_client(fake)
    feed = client.employees(ACME)
    with pytest.raises(PermanentError) as raised:
        list(feed)
    texts = [repr(client), repr(feed), str(raised.value), repr(raised.value)]
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        for secret in (PASSWORD, CLIENT_SECRET, "access-acme-1", "refresh-acme-1"):
            assert secret not in text
