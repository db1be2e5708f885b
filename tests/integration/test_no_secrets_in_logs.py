"""A full fetch/submit cycle, retries, re-auth and failures included, never shows a secret."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy, new_http_client
from adapters.services_manager import ServicesManagerClient
from adapters.sharefile import ShareFileClient
from domain.errors import SfsyncError
from domain.messages import ProvisioningItem
from domain.plan import Action, Rule
from domain.records import Customer
from simulators import Faults, Scenario, ScenarioCustomer, SimulatorServers

SM_TOKEN = "SM-T0KEN-8f3a9c2e"
CLIENT_SECRET = "CL1ENT-SECRET-71d0b4"
PASSWORD = "PA55W0RD-c6e215f9"


class TokenSpy(httpx.BaseTransport):
    """Passes every request through, remembering each token the ShareFile simulator issues."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.tokens: set[str] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/oauth/token"):
            body = json.loads(response.read())
            self.tokens.update(
                body[key] for key in ("access_token", "refresh_token") if key in body
            )
        return response

    def close(self) -> None:
        self.inner.close()


def scenario() -> Scenario:
    return Scenario(
        customers=[
            ScenarioCustomer(
                id="cust-acme",
                name="Acme",
                subdomain="acme",
                sm_users=[
                    {
                        "id": f"u-{n}",
                        "email": f"user{n}@acme.example",
                        "enabled": True,
                        "sharefile": {"state": "not_provisioned"},
                    }
                    for n in range(30)
                ],
                sharefile_employees=[
                    {"Id": f"sf-{n}", "Email": f"user{n}@acme.example"} for n in range(30)
                ],
            )
        ],
        sm_token=SM_TOKEN,
        sharefile_credentials={
            "client_id": "sfsync-test",
            "client_secret": CLIENT_SECRET,
            "username": "api@acme.example",
            "password": PASSWORD,
        },
    )


@pytest.fixture
def servers() -> Iterator[SimulatorServers]:
    with SimulatorServers(scenario(), sharefile_page_size=10) as running:
        yield running


def test_no_secret_reaches_a_log_line_an_exception_or_a_repr(
    servers: SimulatorServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: httpx, httpcore and ours all propagate
    for name in ("httpx", "httpcore", "sfsync"):
        caplog.set_level(logging.DEBUG, logger=name)
    spy = TokenSpy()
    retry = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
    texts: list[str] = []
    errors: list[SfsyncError] = []
    acme = Customer(id="cust-acme", sharefile_enabled=True, subdomain="acme")

    def expect_failure(action: Any) -> None:
        try:
            action()
        except SfsyncError as exc:
            errors.append(exc)
        else:
            pytest.fail("expected the call to fail")

    with new_http_client(transport=spy) as http:
        sm = ServicesManagerClient(servers.sm_url, SM_TOKEN, http=http, retry=retry, page_size=7)
        sharefile = ShareFileClient(
            CredentialStore.from_mapping({"*": servers.sharefile_credentials}),
            token_url_template=servers.sharefile_token_url_template,
            api_url_template=servers.sharefile_api_url_template,
            http=http,
            retry=retry,
        )
        texts += [repr(sm), str(sm), repr(sharefile), str(sharefile)]

        # Throttled at first, so that retry warnings are logged.
        servers.set_faults(
            sm=Faults(throttle_rate=0.4, retry_after_s=0.01, seed=1),
            sharefile=Faults(error_rate=0.3, retry_after_s=0.01, seed=2),
        )
        customers = list(sm.list_customers())
        users = list(sm.list_users("cust-acme"))
        feed = sharefile.employees(acme)
        employees = list(feed)
        texts += [repr(feed), repr(customers), repr(users[:3]), repr(employees[:3])]
        servers.set_faults(sm=Faults(), sharefile=Faults())

        # Re-authentication after the access tokens expire (refresh grant).
        servers.expire_tokens()
        assert len(list(sharefile.employees(acme))) == 30

        items = [
            ProvisioningItem(
                user_id=u.id, action=Action.PROVISION, rule=Rule.EMPLOYEE_WITHOUT_SERVICE
            )
            for u in users
        ]
        result = sm.submit("cust-acme", "req-secrets-1", items)
        texts += [repr(result), repr(sm.submit("cust-acme", "req-secrets-1", items))]

        # Failures: permanent on both sides, and a transient one that exhausts its retries.
        expect_failure(lambda: sm.get_request("cust-acme", "req-unknown"))
        expect_failure(
            lambda: list(sharefile.employees(acme.model_copy(update={"subdomain": "x"})))
        )
        wrong = ShareFileClient(
            CredentialStore.from_mapping(
                {"*": {**servers.sharefile_credentials, "password": PASSWORD + "-wrong"}}
            ),
            token_url_template=servers.sharefile_token_url_template,
            api_url_template=servers.sharefile_api_url_template,
            http=http,
            retry=retry,
        )
        expect_failure(lambda: list(wrong.employees(acme)))
        servers.set_faults(sm=Faults(error_rate=1.0, retry_after_s=0.01))
        expect_failure(lambda: list(sm.list_customers()))
        servers.set_faults(sm=Faults())
        expect_failure(
            lambda: list(
                ServicesManagerClient(
                    servers.sm_url, SM_TOKEN + "-wrong", http=http, retry=retry
                ).list_customers()
            )
        )

    assert len(employees) == 30
    assert len(errors) == 5
    assert len(spy.tokens) >= 4  # two grants at least: the first and the renewal
    assert any(r.levelno == logging.WARNING for r in caplog.records), "no retry was exercised"
    assert any(r.name.startswith("httpx") for r in caplog.records)
    assert any(r.name.startswith("httpcore") for r in caplog.records)

    for error in errors:
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    texts.append(caplog.text)

    secrets = {SM_TOKEN, CLIENT_SECRET, PASSWORD, *spy.tokens}
    leaks = [(secret, text[:200]) for text in texts for secret in secrets if secret in text]
    assert leaks == []
