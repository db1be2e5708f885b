"""The simulators over real loopback HTTP: both contracts, their error shapes, and every fault."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from simulators import (
    DEMO_SCENARIO_PATH,
    Faults,
    Scenario,
    SimulatorServers,
    load_scenario,
)

StartSimulators = Callable[..., SimulatorServers]
BuildScenario = Callable[..., Scenario]


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy from the environment must never sit between us and loopback.
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


def sm_headers(sims: SimulatorServers) -> dict[str, str]:
    return {"Authorization": f"Bearer {sims.sm_token}"}


def token_for(http: httpx.Client, sims: SimulatorServers, subdomain: str) -> dict[str, Any]:
    answer = http.post(
        sims.sharefile_token_url_template.format(subdomain=subdomain),
        data={"grant_type": "password", **sims.sharefile_credentials},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def employees_url(sims: SimulatorServers, subdomain: str) -> str:
    return sims.sharefile_api_url_template.format(subdomain=subdomain) + "Accounts/Employees"


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


def post_bulk(
    http: httpx.Client,
    sims: SimulatorServers,
    request_id: str,
    items: list[dict[str, str]],
    customer_id: str = "cust-alpha",
) -> httpx.Response:
    return http.post(
        f"{sims.sm_url}/customers/{customer_id}/provisioning-requests",
        json={"request_id": request_id, "items": items},
        headers=sm_headers(sims),
    )


def assert_sharefile_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status
    body = answer.json()
    assert body["code"] == code
    assert body["message"]["lang"] == "en-US"
    assert isinstance(body["message"]["value"], str) and body["message"]["value"]


def assert_sm_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status
    body = answer.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- ShareFile: authentication ---------------------------------------------------------------------


def test_password_grant_answers_the_contract_token_shape(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    assert set(token) == {
        "access_token",
        "refresh_token",
        "token_type",
        "expires_in",
        "subdomain",
        "apicp",
        "appcp",
    }
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 28800
    assert token["subdomain"] == "alpha"
    assert (token["apicp"], token["appcp"]) == ("sf-api.com", "sharefile.com")


def test_bad_credentials_get_401_with_the_sharefile_error_shape(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    answer = http.post(
        simulators.sharefile_token_url_template.format(subdomain="alpha"),
        data={"grant_type": "password", **simulators.sharefile_credentials, "password": "wrong"},
    )
    assert_sharefile_error(answer, 401, "Unauthorized")


def test_token_request_must_be_form_encoded(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    answer = http.post(
        simulators.sharefile_token_url_template.format(subdomain="alpha"),
        json={"grant_type": "password", **simulators.sharefile_credentials},
    )
    assert_sharefile_error(answer, 400, "BadRequest")


def test_expired_tokens_get_401_and_the_refresh_grant_issues_a_new_one(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    assert http.get(employees_url(simulators, "alpha"), headers=bearer(token)).status_code == 200
    simulators.expire_tokens()
    expired = http.get(employees_url(simulators, "alpha"), headers=bearer(token))
    assert_sharefile_error(expired, 401, "Unauthorized")

    refreshed = http.post(
        simulators.sharefile_token_url_template.format(subdomain="alpha"),
        data={
            "grant_type": "refresh_token",
            "refresh_token": token["refresh_token"],
            "client_id": simulators.sharefile_credentials["client_id"],
            "client_secret": simulators.sharefile_credentials["client_secret"],
        },
    )
    assert refreshed.status_code == 200
    again = http.get(employees_url(simulators, "alpha"), headers=bearer(refreshed.json()))
    assert again.status_code == 200


def test_token_lifetime_follows_token_ttl_s(
    start_simulators: StartSimulators, http: httpx.Client, build_scenario: BuildScenario
) -> None:
    sims = start_simulators(build_scenario(alpha_employees=3), token_ttl_s=0)
    token = token_for(http, sims, "alpha")
    assert token["expires_in"] == 0
    assert_sharefile_error(
        http.get(employees_url(sims, "alpha"), headers=bearer(token)), 401, "Unauthorized"
    )


def test_a_token_is_valid_only_for_its_own_subdomain(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    beta = token_for(http, simulators, "beta")
    answer = http.get(employees_url(simulators, "alpha"), headers=bearer(beta))
    assert_sharefile_error(answer, 401, "Unauthorized")


def test_missing_or_unknown_bearer_token_gets_401(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    assert_sharefile_error(http.get(employees_url(simulators, "alpha")), 401, "Unauthorized")
    unknown = http.get(employees_url(simulators, "alpha"), headers={"Authorization": "Bearer x"})
    assert_sharefile_error(unknown, 401, "Unauthorized")


def test_unknown_subdomain_gets_404_with_the_sharefile_error_shape(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    answer = http.post(
        simulators.sharefile_token_url_template.format(subdomain="nosuch"),
        data={"grant_type": "password", **simulators.sharefile_credentials},
    )
    assert_sharefile_error(answer, 404, "NotFound")
    assert_sharefile_error(http.get(employees_url(simulators, "nosuch")), 404, "NotFound")


# -- ShareFile: the Employees feed -----------------------------------------------------------------


def test_employees_feed_pages_with_absolute_next_links_until_the_last_page(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    url: str | None = employees_url(simulators, "alpha")
    pages: list[dict[str, Any]] = []
    while url is not None:
        answer = http.get(url, headers=bearer(token))
        assert answer.status_code == 200
        page = answer.json()
        pages.append(page)
        url = page.get("odata.nextLink")
        if url is not None:
            assert url.startswith(simulators.sharefile_api_url_template.format(subdomain="alpha"))
            assert "$skip=" in url
    assert [len(page["value"]) for page in pages] == [500, 500, 234]
    assert all(page["odata.count"] == 1234 for page in pages)
    assert pages[0]["odata.metadata"].endswith("/alpha/sf/v3/$metadata#Contacts")
    ids = [item["Id"] for page in pages for item in page["value"]]
    assert len(set(ids)) == 1234
    assert pages[0]["value"][0]["odata.type"] == "ShareFile.Api.Models.Contact"


def test_unpaged_feed_serves_five_thousand_employees_in_one_answer(
    start_simulators: StartSimulators, http: httpx.Client, build_scenario: BuildScenario
) -> None:
    sims = start_simulators(build_scenario(alpha_employees=5000), sharefile_page_size=None)
    page = http.get(employees_url(sims, "alpha"), headers=bearer(token_for(http, sims, "alpha")))
    body = page.json()
    assert len(body["value"]) == 5000 == body["odata.count"]
    assert "odata.nextLink" not in body


def test_skip_top_and_select_shape_the_feed(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    url = employees_url(simulators, "alpha")
    window = http.get(url, params={"$skip": "10", "$top": "5"}, headers=bearer(token)).json()
    assert [item["Email"] for item in window["value"]] == [
        f"employee{n}@alpha.example" for n in range(10, 15)
    ]
    assert window["odata.count"] == 1234
    assert "odata.nextLink" not in window

    # $top larger than a page: the server pages within the window and says what remains.
    wide = http.get(url, params={"$skip": "100", "$top": "700"}, headers=bearer(token)).json()
    assert len(wide["value"]) == 500
    assert wide["odata.nextLink"].endswith("?$skip=600&$top=200")
    rest = http.get(wide["odata.nextLink"], headers=bearer(token)).json()
    assert len(rest["value"]) == 200 and "odata.nextLink" not in rest

    selected = http.get(
        url, params={"$select": "Id,Email", "$top": "2"}, headers=bearer(token)
    ).json()
    assert all(set(item) == {"odata.type", "Id", "Email"} for item in selected["value"])

    past_the_end = http.get(url, params={"$skip": "5000"}, headers=bearer(token)).json()
    assert past_the_end["value"] == [] and past_the_end["odata.count"] == 1234
    bad = http.get(url, params={"$skip": "x"}, headers=bearer(token))
    assert_sharefile_error(bad, 400, "BadRequest")


def test_next_link_keeps_select_across_pages(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    first = http.get(
        employees_url(simulators, "alpha"), params={"$select": "Id,Email"}, headers=bearer(token)
    ).json()
    second = http.get(first["odata.nextLink"], headers=bearer(token)).json()
    assert set(second["value"][0]) == {"odata.type", "Id", "Email"}


def test_clients_feed_lists_client_users_only(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    token = token_for(http, simulators, "alpha")
    url = simulators.sharefile_api_url_template.format(subdomain="alpha") + "Accounts/Clients"
    body = http.get(url, headers=bearer(token)).json()
    assert body["odata.count"] == 1
    assert [item["Email"] for item in body["value"]] == ["client@partner.example"]


# -- Services Manager: reading ---------------------------------------------------------------------


def test_sm_requires_the_bearer_token(simulators: SimulatorServers, http: httpx.Client) -> None:
    assert_sm_error(http.get(f"{simulators.sm_url}/customers"), 401, "unauthorized")
    wrong = http.get(f"{simulators.sm_url}/customers", headers={"Authorization": "Bearer nope"})
    assert_sm_error(wrong, 401, "unauthorized")


def test_sm_lists_customers_with_their_sharefile_service(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    body = http.get(f"{simulators.sm_url}/customers", headers=sm_headers(simulators)).json()
    assert body["next_cursor"] is None
    assert body["items"][0] == {
        "id": "cust-alpha",
        "name": "Alpha Ltd",
        "sharefile": {"enabled": True, "subdomain": "alpha"},
    }
    assert body["items"][2]["sharefile"]["enabled"] is False
    one = http.get(f"{simulators.sm_url}/customers/cust-beta", headers=sm_headers(simulators))
    assert one.json()["id"] == "cust-beta"
    missing = http.get(f"{simulators.sm_url}/customers/nosuch", headers=sm_headers(simulators))
    assert_sm_error(missing, 404, "not_found")


def test_sm_users_follow_the_opaque_cursor_until_null(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    url = f"{simulators.sm_url}/customers/cust-alpha/users"
    params: dict[str, str] = {"limit": "7"}
    users: list[dict[str, Any]] = []
    pages = 0
    while True:
        body = http.get(url, params=params, headers=sm_headers(simulators)).json()
        users.extend(body["items"])
        pages += 1
        if body["next_cursor"] is None:
            break
        params = {"limit": "7", "cursor": body["next_cursor"]}
    assert pages == 4
    assert len(users) == 25 == len({user["id"] for user in users})
    assert set(users[0]) == {"id", "username", "email", "display_name", "enabled", "sharefile"}
    assert users[0]["sharefile"] == {"state": "provisioned", "updated_at": "2026-11-20T10:00:00Z"}


def test_sm_users_default_to_pages_of_500_and_reject_bad_paging(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    url = f"{simulators.sm_url}/customers/cust-alpha/users"
    headers = sm_headers(simulators)
    assert len(http.get(url, headers=headers).json()["items"]) == 25
    assert http.get(url, params={"limit": "1000"}, headers=headers).status_code == 200
    for params in ({"limit": "1001"}, {"limit": "0"}, {"limit": "ten"}, {"cursor": "garbage!"}):
        assert_sm_error(http.get(url, params=params, headers=headers), 400, "invalid_request")
    assert_sm_error(
        http.get(f"{simulators.sm_url}/customers/nosuch/users", headers=headers), 404, "not_found"
    )


def test_unknown_sm_paths_answer_with_the_contract_error_shape(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    assert_sm_error(
        http.get(f"{simulators.sm_url}/nothing-here", headers=sm_headers(simulators)),
        404,
        "not_found",
    )


# -- Services Manager: bulk provisioning ----------------------------------------------------------


def test_accepted_items_go_through_provisioning_to_provisioned_after_the_delay(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    sims = start_simulators(small_scenario, apply_delay_s=0.3)
    answer = post_bulk(
        http,
        sims,
        "req-1",
        [
            {"user_id": "u-new", "action": "provision"},
            {"user_id": "u-failed", "action": "provision"},
            {"user_id": "u-0001", "action": "deprovision"},
        ],
    )
    assert answer.status_code == 202
    assert answer.json() == {
        "request_id": "req-1",
        "status": "accepted",
        "items": [
            {"user_id": "u-new", "action": "provision", "status": "accepted"},
            {"user_id": "u-failed", "action": "provision", "status": "accepted"},
            {"user_id": "u-0001", "action": "deprovision", "status": "accepted"},
        ],
    }
    states = sims.sm_states()["cust-alpha"]
    assert (states["u-new"], states["u-failed"], states["u-0001"]) == (
        "provisioning",
        "provisioning",
        "deprovisioning",
    )
    page = http.get(f"{sims.sm_url}/customers/cust-alpha/users", headers=sm_headers(sims)).json()
    by_id = {user["id"]: user for user in page["items"]}
    assert by_id["u-new"]["sharefile"]["state"] == "provisioning"
    assert by_id["u-new"]["sharefile"]["updated_at"] != "2026-11-20T10:00:00Z"

    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            states = sims.sm_states()["cust-alpha"]
            assert (states["u-new"], states["u-failed"], states["u-0001"]) == (
                "provisioned",
                "provisioned",
                "not_provisioned",
            )
    # The scenario itself is never mutated: another SimulatorServers starts from it afresh.
    assert small_scenario.customers[0].sm_users[1]["sharefile"]["state"] == "not_provisioned"


def test_same_request_id_again_answers_200_with_the_stored_result_and_changes_nothing(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    items = [{"user_id": "u-new", "action": "provision"}]
    first = post_bulk(http, simulators, "req-same", items)
    assert first.status_code == 202
    states_after_first = simulators.sm_states()
    # Even a different body under the same request_id is a replay of the first answer.
    again = post_bulk(
        http, simulators, "req-same", [{"user_id": "u-0002", "action": "deprovision"}]
    )
    assert again.status_code == 200
    assert again.json() == first.json()
    assert simulators.sm_states() == states_after_first
    stored = http.get(
        f"{simulators.sm_url}/customers/cust-alpha/provisioning-requests/req-same",
        headers=sm_headers(simulators),
    )
    assert stored.status_code == 200 and stored.json() == first.json()
    missing = http.get(
        f"{simulators.sm_url}/customers/cust-alpha/provisioning-requests/nosuch",
        headers=sm_headers(simulators),
    )
    assert_sm_error(missing, 404, "not_found")
    assert [
        (s["request_id"], s["replayed"], s["status_code"]) for s in simulators.submissions()
    ] == [
        ("req-same", False, 202),
        ("req-same", True, 200),
    ]
    assert simulators.duplicate_effective_submissions() == 0


def test_every_rejection_code(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    sims = start_simulators(small_scenario, apply_delay_s=60)
    answer = post_bulk(
        http,
        sims,
        "req-rejections",
        [
            {"user_id": "u-ghost", "action": "provision"},
            {"user_id": "u-prov", "action": "provision"},
            {"user_id": "u-new", "action": "deprovision"},
            {"user_id": "u-flight", "action": "provision"},
            {"user_id": "u-disabled", "action": "provision"},
            {"user_id": "u-0003", "action": "deprovision"},
        ],
    )
    assert answer.status_code == 202
    outcome = {
        item["user_id"]: item["error"]["code"] if item["status"] == "rejected" else "accepted"
        for item in answer.json()["items"]
    }
    assert outcome == {
        "u-ghost": "unknown_user",
        "u-prov": "already_in_state",
        "u-new": "already_in_state",
        "u-flight": "request_in_flight",
        "u-disabled": "user_disabled",
        "u-0003": "accepted",
    }
    # u-0003 is now deprovisioning for a minute: another request for it is in flight.
    later = post_bulk(http, sims, "req-later", [{"user_id": "u-0003", "action": "provision"}])
    assert later.json()["items"][0]["error"]["code"] == "request_in_flight"
    assert sims.sm_states()["cust-alpha"]["u-disabled"] == "not_provisioned"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"request_id": "r", "items": []}, "no items"),
        (
            {
                "request_id": "r",
                "items": [{"user_id": f"u{n}", "action": "provision"} for n in range(1001)],
            },
            "1001 items",
        ),
        (
            {"request_id": "r", "items": [{"user_id": "u-new", "action": "provision"}] * 2},
            "a user twice",
        ),
        ({"request_id": "r", "items": [{"user_id": "u-new", "action": "delete"}]}, "bad action"),
        ({"request_id": "r", "items": [{"action": "provision"}]}, "no user_id"),
        (
            {"request_id": "x" * 129, "items": [{"user_id": "u-new", "action": "provision"}]},
            "long id",
        ),
        ({"items": [{"user_id": "u-new", "action": "provision"}]}, "no request_id"),
        (["not", "an", "object"], "not an object"),
    ],
)
def test_invalid_bulk_requests_get_400_and_change_nothing(
    simulators: SimulatorServers, http: httpx.Client, body: Any, why: str
) -> None:
    before = simulators.sm_states()
    answer = http.post(
        f"{simulators.sm_url}/customers/cust-alpha/provisioning-requests",
        json=body,
        headers=sm_headers(simulators),
    )
    assert_sm_error(answer, 400, "invalid_request")
    assert simulators.sm_states() == before, why
    assert simulators.submissions()[-1]["status_code"] == 400


def test_bulk_request_limits_are_inclusive(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    items = [{"user_id": f"u-x{n}", "action": "provision"} for n in range(1000)]
    answer = post_bulk(http, simulators, "r" * 128, items)
    assert answer.status_code == 202
    assert {item["error"]["code"] for item in answer.json()["items"]} == {"unknown_user"}


def test_body_that_is_not_json_gets_400_and_unknown_customer_404(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    url = f"{simulators.sm_url}/customers/cust-alpha/provisioning-requests"
    answer = http.post(url, content=b"{nope", headers=sm_headers(simulators))
    assert_sm_error(answer, 400, "invalid_request")
    unknown = post_bulk(
        http, simulators, "r1", [{"user_id": "u-new", "action": "provision"}], customer_id="nosuch"
    )
    assert_sm_error(unknown, 404, "not_found")


def test_a_second_request_for_a_change_already_taken_counts_as_a_duplicate(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    post_bulk(http, simulators, "run-1", [{"user_id": "u-new", "action": "provision"}])
    second = post_bulk(http, simulators, "run-2", [{"user_id": "u-new", "action": "provision"}])
    assert second.json()["items"][0]["error"]["code"] == "already_in_state"
    assert simulators.duplicate_effective_submissions() == 1
    # Undoing the change is a new change, not a duplicate.
    post_bulk(http, simulators, "run-3", [{"user_id": "u-new", "action": "deprovision"}])
    post_bulk(http, simulators, "run-4", [{"user_id": "u-new", "action": "provision"}])
    assert simulators.duplicate_effective_submissions() == 1


# -- faults ----------------------------------------------------------------------------------------


def test_error_rate_answers_503_with_retry_after_at_about_that_rate(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    sims = start_simulators(small_scenario, sm_faults=Faults(error_rate=0.3, seed=7))
    statuses = []
    for _ in range(300):
        answer = http.get(f"{sims.sm_url}/customers", headers=sm_headers(sims))
        statuses.append(answer.status_code)
        if answer.status_code == 503:
            assert_sm_error(answer, 503, "service_unavailable")
            assert answer.headers["Retry-After"] == "1"
    assert set(statuses) == {200, 503}
    assert 60 <= statuses.count(503) <= 120


def test_throttling_answers_429_with_retry_after_in_each_api_shape(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    sims = start_simulators(small_scenario)
    sims.set_faults(
        sm=Faults(throttle_rate=1.0, retry_after_s=3),
        sharefile=Faults(throttle_rate=1.0, retry_after_s=0.25),
    )
    throttled = http.get(f"{sims.sm_url}/customers", headers=sm_headers(sims))
    assert_sm_error(throttled, 429, "rate_limited")
    assert throttled.headers["Retry-After"] == "3"
    sharefile = http.get(employees_url(sims, "alpha"))
    assert_sharefile_error(sharefile, 429, "TooManyRequests")
    assert sharefile.headers["Retry-After"] == "0.25"

    sims.set_faults(sm=Faults(), sharefile=Faults(error_rate=1.0))
    assert http.get(f"{sims.sm_url}/customers", headers=sm_headers(sims)).status_code == 200
    assert_sharefile_error(http.get(employees_url(sims, "alpha")), 503, "ServiceUnavailable")


def test_faults_are_reproducible_for_a_seed(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    def statuses(sims: SimulatorServers) -> list[int]:
        return [
            http.get(f"{sims.sm_url}/customers", headers=sm_headers(sims)).status_code
            for _ in range(40)
        ]

    faults = Faults(error_rate=0.2, throttle_rate=0.2, seed=42)
    first = statuses(start_simulators(small_scenario, sm_faults=faults))
    second = statuses(start_simulators(small_scenario, sm_faults=faults))
    assert first == second
    assert {200, 429, 503} <= set(first)


def test_latency_delays_answers_without_blocking_other_requests(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    sims = start_simulators(small_scenario, sm_faults=Faults(latency_ms=300))
    results: list[int] = []

    def call() -> None:
        with httpx.Client(trust_env=False) as client:
            results.append(
                client.get(f"{sims.sm_url}/customers", headers=sm_headers(sims)).status_code
            )

    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert results == [200] * 8
    # Eight concurrent 300 ms answers take about 300 ms, not 2.4 s: the sleep is asynchronous.
    assert 0.3 <= elapsed < 1.5


def test_timeout_customer_hangs_then_gets_504_while_others_answer(
    start_simulators: StartSimulators, small_scenario: Scenario, http: httpx.Client
) -> None:
    faults = Faults(timeout_customers=frozenset({"cust-alpha"}), timeout_s=0.4)
    sims = start_simulators(small_scenario, sm_faults=faults, sharefile_faults=faults)
    started = time.monotonic()
    hung = http.get(f"{sims.sm_url}/customers/cust-alpha/users", headers=sm_headers(sims))
    assert time.monotonic() - started >= 0.4
    assert_sm_error(hung, 504, "gateway_timeout")
    # The ShareFile simulator knows the subdomain belongs to that customer id.
    assert_sharefile_error(http.get(employees_url(sims, "alpha")), 504, "GatewayTimeout")

    started = time.monotonic()
    fine = http.get(f"{sims.sm_url}/customers/cust-beta/users", headers=sm_headers(sims))
    assert fine.status_code == 200 and time.monotonic() - started < 0.4
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{sims.sm_url}/customers/cust-alpha/users", headers=sm_headers(sims), timeout=0.1)


def test_stop_does_not_wait_for_a_request_that_hangs(small_scenario: Scenario) -> None:
    sims = SimulatorServers(
        small_scenario, sm_faults=Faults(timeout_customers=frozenset({"cust-alpha"}))
    )
    sims.start()
    outcome: list[BaseException | int] = []

    def hang() -> None:
        try:
            with httpx.Client(trust_env=False, timeout=30) as client:
                answer = client.get(f"{sims.sm_url}/customers/cust-alpha", headers=sm_headers(sims))
                outcome.append(answer.status_code)
        except httpx.HTTPError as error:
            outcome.append(error)

    caller = threading.Thread(target=hang)
    caller.start()
    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            stats = httpx.get(f"{sims.sm_root_url}/_sim/stats", trust_env=False).json()
            assert stats["requests_served"] == 1
    started = time.monotonic()
    sims.stop()
    caller.join(10)
    assert time.monotonic() - started < 5
    # The hang ends with a transient answer rather than a cancelled request.
    assert outcome == [503]


def test_malformed_truncated_and_empty_feeds(
    start_simulators: StartSimulators, http: httpx.Client, build_scenario: BuildScenario
) -> None:
    scenario = build_scenario(alpha_employees=40)
    sims = start_simulators(
        scenario,
        sharefile_faults=Faults(
            malformed_customers=frozenset({"alpha"}),
            truncated_customers=frozenset({"beta"}),
            empty_customers=frozenset({"cust-off"}),  # named by SM customer id: also matches
        ),
    )
    malformed = http.get(
        employees_url(sims, "alpha"), headers=bearer(token_for(http, sims, "alpha"))
    )
    assert malformed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(malformed.content)

    truncated = http.get(employees_url(sims, "beta"), headers=bearer(token_for(http, sims, "beta")))
    body = truncated.json()
    assert body["odata.count"] > len(body["value"]) == 1
    assert "odata.nextLink" not in body

    empty = http.get(
        employees_url(sims, "off"), headers=bearer(token_for(http, sims, "off"))
    ).json()
    assert empty["value"] == [] and empty["odata.count"] == 0


def test_faults_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=1.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        Faults(error_rate=0.6, throttle_rate=0.6)
    with pytest.raises(TypeError, match="set of names"):
        Faults(timeout_customers="cust-alpha")  # type: ignore[arg-type]


# -- out-of-contract debug endpoints ---------------------------------------------------------------


def test_sim_endpoints_expose_state_submissions_and_stats_without_auth(
    simulators: SimulatorServers, http: httpx.Client
) -> None:
    post_bulk(http, simulators, "req-debug", [{"user_id": "u-new", "action": "provision"}])
    root = simulators.sm_root_url
    assert http.get(f"{root}/_sim/state").json() == simulators.sm_states()
    assert http.get(f"{root}/_sim/submissions").json() == simulators.submissions()
    stats = http.get(f"{root}/_sim/stats").json()
    assert stats["submissions"] == 1 and stats["duplicate_effective_submissions"] == 0

    token = token_for(http, simulators, "alpha")
    expired = http.post(f"{simulators.sharefile_root_url}/_sim/expire-tokens")
    assert expired.status_code == 200
    assert http.get(employees_url(simulators, "alpha"), headers=bearer(token)).status_code == 401
    assert http.get(f"{simulators.sharefile_root_url}/_sim/stats").json()["requests_served"] == 2


def test_demo_scenario_is_served_as_written(
    start_simulators: StartSimulators, http: httpx.Client
) -> None:
    demo = load_scenario(DEMO_SCENARIO_PATH)
    sims = start_simulators(demo)
    customers = http.get(f"{sims.sm_url}/customers", headers=sm_headers(sims)).json()["items"]
    assert len(customers) == 8
    assert [c["id"] for c in customers if not c["sharefile"]["enabled"]] == ["cust-0008"]
    assert sims.sm_states() == {
        c.id: {u["id"]: u["sharefile"]["state"] for u in c.sm_users} for c in demo.customers
    }
    northwind = http.get(
        employees_url(sims, "northwind"), headers=bearer(token_for(http, sims, "northwind"))
    ).json()
    assert "Núñez" in {item["LastName"] for item in northwind["value"]}


def test_ports_can_be_chosen_and_urls_follow_them(
    start_simulators: StartSimulators, small_scenario: Scenario
) -> None:
    sims = start_simulators(small_scenario)
    sm_port = int(sims.sm_url.split(":")[2].split("/")[0])
    assert sims.sm_url == f"http://127.0.0.1:{sm_port}/api/v1"
    assert sims.sharefile_token_url_template.endswith("/{subdomain}/oauth/token")
    assert sims.sharefile_api_url_template.endswith("/{subdomain}/sf/v3/")
    with pytest.raises(OSError):
        SimulatorServers(small_scenario, sm_port=sm_port).start()
