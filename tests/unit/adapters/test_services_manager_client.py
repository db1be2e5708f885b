"""The Services Manager client against an in-memory fake of its contract (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from adapters.http import RetryPolicy
from adapters.services_manager import CALL_LIST_USERS, CALL_SUBMIT, ServicesManagerClient
from domain.errors import PermanentError, TransientError
from domain.messages import ProvisioningItem
from domain.plan import Action, Rule
from domain.records import SharefileState

BASE = "http://sm.test/api/v1"
TOKEN = "sm-t0ken-never-shown"


def no_wait_policy(**overrides: Any) -> RetryPolicy:
    settings: dict[str, Any] = {
        "attempts": 3,
        "initial_backoff_s": 0.0,
        "max_backoff_s": 0.0,
        "sleep": lambda _: None,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)


def user(number: int, state: str = "provisioned") -> dict[str, object]:
    return {
        "id": f"u-{number:06d}",
        "username": f"user{number}@acme.example",
        "email": f"User{number}@Acme.example",
        "display_name": f"User {number}",
        "enabled": True,
        "sharefile": {"state": state, "updated_at": "2026-11-20T10:00:00Z"},
    }


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


@dataclass
class FakeServicesManager:
    """Just enough of the SM contract, with cursor paging that honours ?limit=."""

    customers: list[dict[str, object]] = field(default_factory=list)
    users: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    stored: dict[str, dict[str, object]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    override: Callable[[httpx.Request], httpx.Response | None] | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return error(401, "unauthorized", "missing or wrong token")
        if self.override is not None:
            answer = self.override(request)
            if answer is not None:
                return answer
        path = request.url.path.removeprefix("/api/v1")
        parts = path.strip("/").split("/")
        if parts == ["customers"]:
            return self._page(request, self.customers)
        if len(parts) == 2 and parts[0] == "customers":
            found = [c for c in self.customers if c["id"] == parts[1]]
            return httpx.Response(200, json=found[0]) if found else error(404, "not_found", "no")
        if len(parts) == 3 and parts[2] == "users":
            if parts[1] not in self.users:
                return error(404, "not_found", f"customer {parts[1]} does not exist")
            return self._page(request, self.users[parts[1]])
        if len(parts) == 3 and parts[2] == "provisioning-requests":
            body = json.loads(request.content)
            if body["request_id"] in self.stored:
                return httpx.Response(200, json=self.stored[body["request_id"]])
            result = {
                "request_id": body["request_id"],
                "status": "accepted",
                "items": [
                    {**item, "status": "accepted"}
                    if item["action"] == "provision"
                    else {
                        **item,
                        "status": "rejected",
                        "error": {"code": "already_in_state", "message": "not provisioned"},
                    }
                    for item in body["items"]
                ],
            }
            self.stored[body["request_id"]] = result
            return httpx.Response(202, json=result)
        if len(parts) == 4 and parts[2] == "provisioning-requests":
            stored = self.stored.get(parts[3])
            return httpx.Response(200, json=stored) if stored else error(404, "not_found", "?")
        return error(404, "not_found", "no such route")

    def _page(self, request: httpx.Request, rows: list[dict[str, object]]) -> httpx.Response:
        limit = int(request.url.params.get("limit", "500"))
        start = int(request.url.params.get("cursor", "0"))
        end = start + limit
        return httpx.Response(
            200,
            json={"items": rows[start:end], "next_cursor": str(end) if end < len(rows) else None},
        )

    def client(self, **kwargs: Any) -> ServicesManagerClient:
        http = httpx.Client(transport=httpx.MockTransport(self.handle))
        kwargs.setdefault("retry", no_wait_policy())
        return ServicesManagerClient(BASE, TOKEN, http=http, **kwargs)


@pytest.fixture
def sm() -> FakeServicesManager:
    return FakeServicesManager(
        customers=[
            {
                "id": "cust-0001",
                "name": "Acme",
                "sharefile": {"enabled": True, "subdomain": "acme"},
            },
            {"id": "cust-0002", "name": "Off", "sharefile": {"enabled": False, "subdomain": None}},
            {
                "id": "cust-0003",
                "name": "Globex",
                "sharefile": {"enabled": True, "subdomain": "gx"},
            },
        ],
        users={"cust-0001": [user(n) for n in range(7)]},
    )


def items(*pairs: tuple[str, Action]) -> list[ProvisioningItem]:
    return [
        ProvisioningItem(
            user_id=user_id,
            action=action,
            rule=Rule.EMPLOYEE_WITHOUT_SERVICE
            if action is Action.PROVISION
            else Rule.ABSENT_FROM_SHAREFILE,
        )
        for user_id, action in pairs
    ]


def test_list_customers_follows_cursors_and_keeps_only_sharefile_enabled(
    sm: FakeServicesManager,
) -> None:
    customers = list(sm.client(page_size=1).list_customers())
    assert [c.id for c in customers] == ["cust-0001", "cust-0003"]
    assert customers[0].subdomain == "acme"
    assert len(sm.requests) == 3


def test_list_users_pages_with_the_page_size_and_parses_records(sm: FakeServicesManager) -> None:
    users = list(sm.client(page_size=3).list_users("cust-0001"))
    assert [u.id for u in users] == [f"u-{n:06d}" for n in range(7)]
    assert users[0].state is SharefileState.PROVISIONED
    assert [r.url.params.get("limit") for r in sm.requests] == ["3", "3", "3"]
    assert [r.url.params.get("cursor") for r in sm.requests] == [None, "3", "6"]


def test_list_users_streams_page_by_page(sm: FakeServicesManager) -> None:
    stream = sm.client(page_size=3).list_users("cust-0001")
    next(stream)
    assert len(sm.requests) == 1


def test_every_request_carries_the_bearer_token(sm: FakeServicesManager) -> None:
    list(sm.client().list_customers())
    assert sm.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(sm.requests[0].url)


def test_get_customer_and_its_404(sm: FakeServicesManager) -> None:
    client = sm.client()
    assert client.get_customer("cust-0003").subdomain == "gx"
    with pytest.raises(PermanentError) as raised:
        client.get_customer("cust-9999")
    assert raised.value.status == 404
    assert raised.value.code == "not_found"


def test_ids_are_quoted_into_one_path_segment(sm: FakeServicesManager) -> None:
    with pytest.raises(PermanentError):
        sm.client().get_customer("../customers")
    assert sm.requests[0].url.raw_path == b"/api/v1/customers/..%2Fcustomers"


def test_unknown_customer_users_is_permanent_with_code_and_message(
    sm: FakeServicesManager,
) -> None:
    with pytest.raises(PermanentError) as raised:
        list(sm.client().list_users("cust-0404"))
    error = raised.value
    assert (error.status, error.code, error.call, error.customer_id) == (
        404,
        "not_found",
        CALL_LIST_USERS,
        "cust-0404",
    )
    assert "customer cust-0404 does not exist" in str(error)


def test_a_wrong_token_is_permanent_and_not_retried(sm: FakeServicesManager) -> None:
    client = ServicesManagerClient(
        BASE,
        "wrong-token",
        http=httpx.Client(transport=httpx.MockTransport(sm.handle)),
        retry=no_wait_policy(),
    )
    with pytest.raises(PermanentError) as raised:
        list(client.list_customers())
    assert raised.value.status == 401
    assert len(sm.requests) == 1


def test_submit_accepted_202_is_not_a_replay_and_maps_item_errors(
    sm: FakeServicesManager,
) -> None:
    result = sm.client().submit(
        "cust-0001",
        "req-1",
        items(("u-000001", Action.PROVISION), ("u-000002", Action.DEPROVISION)),
    )
    assert result.replayed is False
    assert result.request_id == "req-1"
    accepted, rejected = result.items
    assert (accepted.user_id, accepted.status, accepted.error_code) == (
        "u-000001",
        "accepted",
        None,
    )
    assert (rejected.status, rejected.error_code, rejected.error_message) == (
        "rejected",
        "already_in_state",
        "not provisioned",
    )
    body = json.loads(sm.requests[0].content)
    assert body == {
        "request_id": "req-1",
        "items": [
            {"user_id": "u-000001", "action": "provision"},
            {"user_id": "u-000002", "action": "deprovision"},
        ],
    }


def test_submitting_the_same_request_id_again_is_a_replay(sm: FakeServicesManager) -> None:
    client = sm.client()
    first = client.submit("cust-0001", "req-1", items(("u-000001", Action.PROVISION)))
    second = client.submit("cust-0001", "req-1", items(("u-000001", Action.PROVISION)))
    assert second.replayed is True
    assert second.items == first.items


def test_get_request_returns_the_stored_result(sm: FakeServicesManager) -> None:
    client = sm.client()
    client.submit("cust-0001", "req-7", items(("u-000001", Action.PROVISION)))
    stored = client.get_request("cust-0001", "req-7")
    assert stored.request_id == "req-7"
    assert stored.items[0].status == "accepted"
    with pytest.raises(PermanentError):
        client.get_request("cust-0001", "req-unknown")


def test_submit_rejects_more_than_1000_items_or_none(sm: FakeServicesManager) -> None:
    client = sm.client()
    too_many = items(*((f"u-{n}", Action.PROVISION) for n in range(1001)))
    with pytest.raises(ValueError, match="1001"):
        client.submit("cust-0001", "req-big", too_many)
    with pytest.raises(ValueError):
        client.submit("cust-0001", "req-empty", [])
    assert sm.requests == []


def test_a_submit_whose_answer_was_lost_is_retried_and_comes_back_as_replay(
    sm: FakeServicesManager,
) -> None:
    lost_once: list[bool] = []

    def lose_first_answer(request: httpx.Request) -> httpx.Response | None:
        if request.method == "POST" and not lost_once:
            lost_once.append(True)
            sm.override = None
            sm.handle(request)  # SM stores the request, but the answer never arrives
            sm.override = lose_first_answer
            raise httpx.ReadTimeout("read timed out", request=request)
        return None

    sm.override = lose_first_answer
    result = sm.client().submit("cust-0001", "req-2", items(("u-000003", Action.PROVISION)))
    assert result.replayed is True


def test_a_503_burst_is_retried_then_exhaustion_is_transient(sm: FakeServicesManager) -> None:
    sm.override = lambda request: error(503, "unavailable", "maintenance")
    with pytest.raises(TransientError) as raised:
        list(sm.client(retry=no_wait_policy(attempts=4)).list_users("cust-0001"))
    assert len(sm.requests) == 4
    assert "maintenance" in str(raised.value)
    assert "4 attempt" in str(raised.value)


def test_a_200_that_is_not_json_is_malformed(sm: FakeServicesManager) -> None:
    sm.override = lambda request: httpx.Response(200, content=b"{'items': [")
    with pytest.raises(PermanentError, match="malformed response"):
        list(sm.client().list_users("cust-0001"))


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"items": None, "next_cursor": None},
        {"next_cursor": None},
        {"items": [], "next_cursor": 3},
        {"items": [{"id": "u-1", "sharefile": {"state": "on_holiday"}}], "next_cursor": None},
    ],
)
def test_a_200_of_the_wrong_shape_is_malformed_never_an_empty_list(
    sm: FakeServicesManager, body: object
) -> None:
    sm.override = lambda request: httpx.Response(200, json=body)
    with pytest.raises(PermanentError, match="malformed response") as raised:
        list(sm.client().list_users("cust-0001"))
    assert raised.value.call == CALL_LIST_USERS


def test_an_opaque_cursor_goes_back_exactly_as_it_came(sm: FakeServicesManager) -> None:
    cursor = "a/b+c=d&e f%2F"
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("cursor"))
        return httpx.Response(200, json={"items": [], "next_cursor": None if seen[-1] else cursor})

    sm.override = answer
    assert list(sm.client(page_size=2).list_users("cust-0001")) == []
    assert seen == [None, cursor]
    assert [r.url.params.get("limit") for r in sm.requests] == ["2", "2"]


def test_a_repeating_cursor_is_malformed_not_an_endless_loop(sm: FakeServicesManager) -> None:
    sm.override = lambda request: httpx.Response(200, json={"items": [], "next_cursor": "same"})
    with pytest.raises(PermanentError, match="repeats"):
        list(sm.client().list_customers())


def test_a_malformed_submit_answer_is_permanent(sm: FakeServicesManager) -> None:
    sm.override = lambda request: httpx.Response(
        202, json={"request_id": "r", "status": "accepted", "items": [{"user_id": "u"}]}
    )
    with pytest.raises(PermanentError, match="malformed response") as raised:
        sm.client().submit("cust-0001", "r", items(("u", Action.PROVISION)))
    assert raised.value.call == CALL_SUBMIT


def test_the_token_never_appears_in_reprs_or_errors(sm: FakeServicesManager) -> None:
    client = sm.client()
    sm.override = lambda request: error(400, "invalid_request", f"bad token {TOKEN}")
    with pytest.raises(PermanentError) as raised:
        list(client.list_customers())
    assert TOKEN not in str(raised.value)
    assert TOKEN not in repr(raised.value)
    assert TOKEN not in repr(client)


def test_page_size_must_fit_the_contract() -> None:
    with pytest.raises(ValueError):
        ServicesManagerClient(BASE, TOKEN, page_size=1001)


def test_close_leaves_a_shared_http_client_open(sm: FakeServicesManager) -> None:
    http = httpx.Client(transport=httpx.MockTransport(sm.handle))
    ServicesManagerClient(BASE, TOKEN, http=http).close()
    assert not http.is_closed
    http.close()
