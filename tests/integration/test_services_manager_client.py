"""The Services Manager client over real HTTP against the loopback SM simulator."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from adapters.http import RetryPolicy, new_http_client
from adapters.services_manager import CALL_LIST_USERS, ServicesManagerClient
from domain.errors import PermanentError, TransientError
from domain.messages import ProvisioningItem
from domain.plan import Action, Rule
from domain.records import SharefileState
from simulators import Faults, Scenario, ScenarioCustomer, SimulatorServers


def sm_user(customer: str, number: int, state: str) -> dict[str, Any]:
    return {
        "id": f"{customer}-u{number:03d}",
        "username": f"user{number}@{customer}.example",
        "email": f"User{number}@{customer}.example",
        "display_name": f"User {number}",
        "enabled": True,
        "sharefile": {"state": state, "updated_at": "2026-11-20T10:00:00Z"},
    }


def sm_customer(name: str, users: int, *, enabled: bool = True) -> ScenarioCustomer:
    states = ["not_provisioned", "provisioned", "failed"]
    return ScenarioCustomer(
        id=f"cust-{name}",
        name=name.title(),
        sharefile_enabled=enabled,
        subdomain=name,
        sm_users=[sm_user(name, n, states[n % 3]) for n in range(users)],
        sharefile_employees=[],
    )


SCENARIO = Scenario(
    customers=[
        sm_customer("acme", 25),
        sm_customer("disabled", 2, enabled=False),
        sm_customer("globex", 3),
        sm_customer("initech", 4),
    ],
    sm_token="sm-integration-token",
)


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
def sm_client(
    servers: SimulatorServers, *, token: str | None = None, **kwargs: Any
) -> Iterator[ServicesManagerClient]:
    kwargs.setdefault("retry", policy())
    with new_http_client(timeout_s=5.0) as http:
        yield ServicesManagerClient(servers.sm_url, token or servers.sm_token, http=http, **kwargs)


@pytest.fixture(scope="module")
def servers() -> Iterator[SimulatorServers]:
    with SimulatorServers(SCENARIO) as running:
        yield running


@pytest.fixture
def client(servers: SimulatorServers) -> Iterator[ServicesManagerClient]:
    servers.set_faults(sm=Faults())
    with sm_client(servers, page_size=7) as sm:
        yield sm
    servers.set_faults(sm=Faults())


def provision(*user_ids: str) -> list[ProvisioningItem]:
    return [
        ProvisioningItem(user_id=u, action=Action.PROVISION, rule=Rule.EMPLOYEE_WITHOUT_SERVICE)
        for u in user_ids
    ]


def test_users_are_paged_by_cursor_with_a_small_page_size(client: ServicesManagerClient) -> None:
    users = list(client.list_users("cust-acme"))
    assert [u.id for u in users] == [f"acme-u{n:03d}" for n in range(25)]
    assert users[1].state is SharefileState.PROVISIONED


def test_customers_are_listed_across_pages_and_only_if_sharefile_is_enabled(
    servers: SimulatorServers,
) -> None:
    with sm_client(servers, page_size=1) as client:
        customers = list(client.list_customers())
    assert [c.id for c in customers] == ["cust-acme", "cust-globex", "cust-initech"]
    assert customers[0].subdomain == "acme"


def test_get_customer_and_an_unknown_one(client: ServicesManagerClient) -> None:
    assert client.get_customer("cust-globex").subdomain == "globex"
    with pytest.raises(PermanentError) as raised:
        client.get_customer("cust-nosuch")
    assert (raised.value.status, raised.value.code) == (404, "not_found")


def test_an_unknown_customer_users_is_a_permanent_404(client: ServicesManagerClient) -> None:
    with pytest.raises(PermanentError) as raised:
        list(client.list_users("cust-nosuch"))
    error = raised.value
    assert (error.status, error.code, error.call) == (404, "not_found", CALL_LIST_USERS)
    assert "no customer cust-nosuch" in str(error)


def test_a_wrong_token_is_a_permanent_401(servers: SimulatorServers) -> None:
    with sm_client(servers, token="wrong") as client, pytest.raises(PermanentError) as raised:
        list(client.list_customers())
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")


def test_bulk_submit_then_replay_then_get_request(
    servers: SimulatorServers, client: ServicesManagerClient
) -> None:
    items = provision("globex-u000", "globex-u001", "globex-u999")
    first = client.submit("cust-globex", "req-integration-1", items)
    assert first.replayed is False
    assert [(i.user_id, i.status, i.error_code) for i in first.items] == [
        ("globex-u000", "accepted", None),
        ("globex-u001", "rejected", "already_in_state"),
        ("globex-u999", "rejected", "unknown_user"),
    ]
    assert first.items[2].error_message
    again = client.submit("cust-globex", "req-integration-1", items)
    assert again.replayed is True
    assert again.items == first.items
    stored = client.get_request("cust-globex", "req-integration-1")
    assert stored.items == first.items
    posts = [s for s in servers.submissions() if s["request_id"] == "req-integration-1"]
    assert [(s["status_code"], s["replayed"]) for s in posts] == [(202, False), (200, True)]
    assert servers.sm_states()["cust-globex"]["globex-u000"] in {"provisioning", "provisioned"}


def test_an_unknown_request_is_a_permanent_404(client: ServicesManagerClient) -> None:
    with pytest.raises(PermanentError) as raised:
        client.get_request("cust-globex", "req-never-sent")
    assert raised.value.code == "not_found"


def test_throttling_with_retry_after_is_waited_out(servers: SimulatorServers) -> None:
    waits: list[float] = []
    servers.set_faults(sm=Faults(throttle_rate=0.5, retry_after_s=0.02, seed=3))
    with sm_client(servers, page_size=2, retry=policy(attempts=10, sleep=waits.append)) as client:
        assert len(list(client.list_users("cust-acme"))) == 25
    servers.set_faults(sm=Faults())
    assert waits
    assert set(waits) == {0.02}


def test_a_503_burst_during_submit_recovers_without_a_double_request(
    servers: SimulatorServers,
) -> None:
    waits: list[float] = []

    def sleep_then_recover(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            servers.set_faults(sm=Faults())

    servers.set_faults(sm=Faults(error_rate=1.0, retry_after_s=0.01))
    with sm_client(servers, retry=policy(sleep=sleep_then_recover)) as client:
        result = client.submit("cust-initech", "req-burst", provision("initech-u000"))
    assert result.replayed is False
    assert result.items[0].status == "accepted"
    assert len([s for s in servers.submissions() if s["request_id"] == "req-burst"]) == 1


def test_an_outage_that_lasts_is_a_transient_error(servers: SimulatorServers) -> None:
    servers.set_faults(sm=Faults(error_rate=1.0, retry_after_s=0.01))
    with (
        sm_client(servers, retry=policy(attempts=3)) as client,
        pytest.raises(TransientError) as raised,
    ):
        list(client.list_customers())
    servers.set_faults(sm=Faults())
    assert (raised.value.status, raised.value.code) == (503, "service_unavailable")
    assert "3 attempt" in str(raised.value)
