"""The ShareFile client over real HTTP against the loopback ShareFile simulator."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from adapters import sharefile as sharefile_module
from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy, new_http_client
from adapters.sharefile import CALL_EMPLOYEES, CALL_TOKEN, ShareFileClient
from domain.errors import PermanentError, TransientError
from domain.records import Customer
from simulators import Faults, Scenario, ScenarioCustomer, SimulatorServers


def contacts(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "odata.type": "ShareFile.Api.Models.Contact",
            "Id": f"{prefix}-{n:05d}",
            "Email": f"{prefix}.{n}@{prefix}.example",
            "FirstName": f"First{n}",
            "LastName": prefix.title(),
            "IsDisabled": n % 50 == 0,
        }
        for n in range(count)
    ]


def account(subdomain: str, employees: int, clients: int = 0) -> ScenarioCustomer:
    return ScenarioCustomer(
        id=f"cust-{subdomain}",
        name=subdomain.title(),
        subdomain=subdomain,
        sm_users=[],
        sharefile_employees=contacts(subdomain, employees),
        sharefile_clients=contacts(f"{subdomain}-client", clients),
    )


SCENARIO = Scenario(
    customers=[
        account("acme", 1234, clients=3),
        account("big", 5000),
        account("slow", 10),
        account("short", 40),
        account("broken", 10),
        account("hollow", 25),
    ]
)


def customer(subdomain: str) -> Customer:
    return Customer(id=f"cust-{subdomain}", sharefile_enabled=True, subdomain=subdomain)


def policy(**overrides: Any) -> RetryPolicy:
    settings: dict[str, Any] = {
        "attempts": 5,
        "total_seconds": 10.0,
        "initial_backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "max_retry_after_s": 1.0,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)


@contextmanager
def sharefile_client(
    servers: SimulatorServers, *, timeout_s: float = 5.0, **kwargs: Any
) -> Iterator[ShareFileClient]:
    """A client on its own pooled httpx client, both closed afterwards."""
    kwargs.setdefault("retry", policy())
    with new_http_client(timeout_s=timeout_s, connect_timeout_s=timeout_s) as http:
        yield ShareFileClient(
            CredentialStore.from_mapping({"*": servers.sharefile_credentials}),
            token_url_template=servers.sharefile_token_url_template,
            api_url_template=servers.sharefile_api_url_template,
            http=http,
            **kwargs,
        )


@pytest.fixture(scope="module")
def paged() -> Iterator[SimulatorServers]:
    with SimulatorServers(SCENARIO, sharefile_page_size=500) as servers:
        yield servers


@pytest.fixture
def client(paged: SimulatorServers) -> Iterator[ShareFileClient]:
    paged.set_faults(sharefile=Faults())
    with sharefile_client(paged) as sharefile:
        yield sharefile
    paged.set_faults(sharefile=Faults())


def test_a_paged_feed_is_followed_through_every_next_link(
    client: ShareFileClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sfsync.adapters.sharefile")
    feed = client.employees(customer("acme"))
    users = list(feed)
    assert [u.id for u in users] == [f"acme-{n:05d}" for n in range(1234)]
    assert (feed.declared_count, feed.received) == (1234, 1234)
    assert users[0].is_disabled and not users[1].is_disabled
    pages = [r for r in caplog.records if "page" in r.getMessage() and r.levelno == logging.DEBUG]
    assert len(pages) == 3


def test_a_second_read_yields_only_the_users_the_first_did_not_list(
    client: ShareFileClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = list(client.employees(customer("acme")))
    missed = [first[10], first[700]]  # on pages 1 and 2 of 3
    known = {u.id for u in first} - {u.id for u in missed}
    records_pages = []
    full_page = sharefile_module._ODATA_PAGE

    class Counting:
        def validate_json(self, data: bytes, **kwargs: Any) -> Any:
            records_pages.append(len(data))
            return full_page.validate_json(data, **kwargs)

    monkeypatch.setattr(sharefile_module, "_ODATA_PAGE", Counting())
    feed = client.employees(customer("acme"), known=known)
    assert list(feed) == missed  # the same records, in feed order
    assert (feed.declared_count, feed.received, feed.pages) == (1234, 1234, 3)
    # Records were built for the two pages with someone new; page 3 was only read for its ids.
    assert len(records_pages) == 2


def test_an_unpaged_feed_of_5000_comes_whole() -> None:
    with (
        SimulatorServers(SCENARIO, sharefile_page_size=None) as servers,
        sharefile_client(servers) as client,
    ):
        feed = client.employees(customer("big"))
        assert sum(1 for _ in feed) == 5000
        assert (feed.declared_count, feed.received) == (5000, 5000)


def test_clients_feed_is_not_employees(client: ShareFileClient) -> None:
    users = list(client.clients(customer("acme")))
    assert len(users) == 3
    assert not any(u.is_employee for u in users)


def test_expired_tokens_are_renewed_once(
    client: ShareFileClient, paged: SimulatorServers, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(list(client.employees(customer("slow")))) == 10
    paged.expire_tokens()
    caplog.set_level(logging.INFO, logger="sfsync.adapters.sharefile")
    assert len(list(client.employees(customer("slow")))) == 10
    assert any("re-authenticating once" in r.getMessage() for r in caplog.records)


def test_throttling_with_retry_after_is_waited_out(paged: SimulatorServers) -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    paged.set_faults(sharefile=Faults(throttle_rate=0.5, retry_after_s=0.05, seed=7))
    with sharefile_client(paged, retry=policy(attempts=10, sleep=sleep)) as client:
        assert len(list(client.employees(customer("acme")))) == 1234
    paged.set_faults(sharefile=Faults())
    assert waits
    assert set(waits) == {0.05}


def test_a_burst_of_503s_that_recovers_is_retried_through(paged: SimulatorServers) -> None:
    waits: list[float] = []

    def sleep_then_recover(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            paged.set_faults(sharefile=Faults())

    paged.set_faults(sharefile=Faults(error_rate=1.0, retry_after_s=0.01))
    with sharefile_client(paged, retry=policy(sleep=sleep_then_recover)) as client:
        assert len(list(client.employees(customer("short")))) == 40
    assert len(waits) == 3


def test_a_503_burst_that_lasts_is_a_transient_error(paged: SimulatorServers) -> None:
    paged.set_faults(sharefile=Faults(error_rate=1.0, retry_after_s=0.01))
    with (
        sharefile_client(paged, retry=policy(attempts=3)) as client,
        pytest.raises(TransientError) as raised,
    ):
        list(client.employees(customer("short")))
    paged.set_faults(sharefile=Faults())
    assert raised.value.status == 503
    assert "3 attempt" in str(raised.value)
    assert "temporarily unavailable" in str(raised.value)


def test_an_unknown_account_is_a_permanent_404(client: ShareFileClient) -> None:
    with pytest.raises(PermanentError) as raised:
        list(client.employees(customer("nosuch")))
    error = raised.value
    assert (error.status, error.call, error.customer_id) == (404, CALL_TOKEN, "cust-nosuch")
    assert "Account nosuch not found" in str(error)


def test_wrong_credentials_are_permanent(paged: SimulatorServers) -> None:
    wrong = {**paged.sharefile_credentials, "password": "not-the-password"}
    client = ShareFileClient(
        CredentialStore.from_mapping({"*": wrong}),
        token_url_template=paged.sharefile_token_url_template,
        api_url_template=paged.sharefile_api_url_template,
        retry=policy(),
    )
    with client, pytest.raises(PermanentError) as raised:
        list(client.employees(customer("acme")))
    assert raised.value.call == CALL_TOKEN
    assert "not-the-password" not in str(raised.value)


def test_one_hanging_customer_times_out_while_another_is_served() -> None:
    faults = Faults(timeout_customers=frozenset({"slow"}), timeout_s=1.5)
    with (
        SimulatorServers(SCENARIO, sharefile_faults=faults) as servers,
        sharefile_client(servers, timeout_s=0.2, retry=policy(attempts=2)) as client,
    ):
        outcome: dict[str, object] = {}

        def run(name: str, work: Callable[[], object]) -> None:
            try:
                outcome[name] = work()
            except (TransientError, PermanentError) as exc:
                outcome[name] = exc

        started = time.monotonic()
        hanging = threading.Thread(
            target=run, args=("slow", lambda: list(client.employees(customer("slow"))))
        )
        hanging.start()
        fine = len(list(client.employees(customer("acme"))))
        fine_after = time.monotonic() - started
        hanging.join()
    assert fine == 1234
    assert fine_after < 1.0
    error = outcome["slow"]
    assert isinstance(error, TransientError)
    assert error.customer_id == "cust-slow"
    assert "ReadTimeout" in str(error)


def test_a_feed_shorter_than_its_count_shows_declared_above_received(
    paged: SimulatorServers, client: ShareFileClient
) -> None:
    paged.set_faults(sharefile=Faults(truncated_customers=frozenset({"short"})))
    feed = client.employees(customer("short"))
    assert len(list(feed)) == 40
    assert feed.declared_count is not None
    assert feed.declared_count > feed.received == 40


def test_a_broken_200_is_a_permanent_malformed_response(
    paged: SimulatorServers, client: ShareFileClient
) -> None:
    paged.set_faults(sharefile=Faults(malformed_customers=frozenset({"broken"})))
    with pytest.raises(PermanentError) as raised:
        list(client.employees(customer("broken")))
    assert "malformed response" in str(raised.value)
    assert raised.value.call == CALL_EMPLOYEES


def test_an_empty_feed_is_empty_with_a_zero_count(
    paged: SimulatorServers, client: ShareFileClient
) -> None:
    paged.set_faults(sharefile=Faults(empty_customers=frozenset({"hollow"})))
    feed = client.employees(customer("hollow"))
    assert list(feed) == []
    assert (feed.declared_count, feed.received) == (0, 0)
