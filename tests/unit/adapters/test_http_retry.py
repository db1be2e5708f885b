"""The shared retry loop: what is retried, how long it waits, when it gives up, and what it says."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from adapters.http import (
    RetryPolicy,
    new_http_client,
    parse_json,
    parse_retry_after,
    send_with_retry,
)
from domain.errors import PermanentError, TransientError

CALL = "GET sm customers"
CUSTOMER = "cust-0001"
URL = "http://sm.test/api/v1/customers"


@dataclass
class FakeTime:
    """A monotonic clock and a sleep that advances it, recording every wait."""

    now: float = 1_000.0
    waits: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def policy(self, **overrides: Any) -> RetryPolicy:
        settings: dict[str, Any] = {
            "attempts": 5,
            "total_seconds": 30.0,
            "initial_backoff_s": 0.01,
            "max_backoff_s": 0.05,
            "sleep": self.sleep,
            "clock": self.clock,
        }
        settings.update(overrides)
        return RetryPolicy(**settings)


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


Answer = httpx.Response | Exception


def scripted(answers: Sequence[Answer]) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose server gives the answers in order (an exception is raised as a failure)."""
    seen: list[httpx.Request] = []
    queue: Iterator[Answer] = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(queue)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handler)), seen


def sm_error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message}}, headers=headers
    )


def ok() -> httpx.Response:
    return httpx.Response(200, json={"items": [], "next_cursor": None})


def describe_sm(response: httpx.Response) -> tuple[str | None, str]:
    error = response.json()["error"]
    return error["code"], error["message"]


def call(client: httpx.Client, policy: RetryPolicy, **kwargs: Any) -> httpx.Response:
    return send_with_retry(
        lambda: client.get(URL),
        call=CALL,
        customer_id=CUSTOMER,
        policy=policy,
        describe=describe_sm,
        **kwargs,
    )


def test_503_is_retried_then_succeeds(fake_time: FakeTime) -> None:
    client, seen = scripted(
        [sm_error(503, "unavailable", "down"), sm_error(503, "unavailable", "down"), ok()]
    )
    response = call(client, fake_time.policy())
    assert response.status_code == 200
    assert len(seen) == 3
    assert len(fake_time.waits) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_every_transient_status_is_retried(fake_time: FakeTime, status: int) -> None:
    client, seen = scripted([sm_error(status, "busy", "try later"), ok()])
    assert call(client, fake_time.policy()).status_code == 200
    assert len(seen) == 2


def test_429_retry_after_in_seconds_is_the_wait(fake_time: FakeTime) -> None:
    client, _ = scripted([sm_error(429, "rate_limited", "slow down", **{"Retry-After": "7"}), ok()])
    call(client, fake_time.policy())
    assert fake_time.waits == [7.0]


def test_429_retry_after_as_http_date_is_the_wait(fake_time: FakeTime) -> None:
    server_now = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)
    headers = {
        "Date": format_datetime(server_now, usegmt=True),
        "Retry-After": format_datetime(server_now + timedelta(seconds=12), usegmt=True),
    }
    client, _ = scripted([sm_error(429, "rate_limited", "slow down", **headers), ok()])
    call(client, fake_time.policy())
    assert fake_time.waits == [12.0]


def test_retry_after_http_date_without_date_header_uses_the_local_clock() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    response = httpx.Response(429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    wait = parse_retry_after(response)
    assert wait is not None
    assert 27 <= wait <= 30


def test_retry_after_in_the_past_or_garbage_does_not_break_the_wait() -> None:
    past = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert parse_retry_after(past) == 0.0
    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Response(429)) is None


def test_retry_after_is_capped_by_max_retry_after_s(fake_time: FakeTime) -> None:
    client, _ = scripted([sm_error(429, "rate_limited", "later", **{"Retry-After": "3600"}), ok()])
    call(client, fake_time.policy(max_retry_after_s=5.0, total_seconds=100.0))
    assert fake_time.waits == [5.0]


def test_429_without_retry_after_backs_off_exponentially_within_bounds(
    fake_time: FakeTime,
) -> None:
    client, _ = scripted([sm_error(429, "rate_limited", "slow down")] * 5 + [ok()])
    policy = fake_time.policy(attempts=6, initial_backoff_s=1.0, max_backoff_s=6.0)
    call(client, policy)
    assert len(fake_time.waits) == 5
    assert all(1.0 <= wait <= 6.0 for wait in fake_time.waits)
    # Exponential: the n-th wait is at least initial * 2**(n-1), until the ceiling.
    assert [min(6.0, 2.0**n) <= wait for n, wait in enumerate(fake_time.waits)] == [True] * 5
    assert fake_time.waits[-1] == 6.0


def test_gives_up_after_attempts_with_a_transient_error_that_says_what_happened(
    fake_time: FakeTime,
) -> None:
    client, seen = scripted([sm_error(503, "unavailable", "portal is restarting")] * 3)
    with pytest.raises(TransientError) as raised:
        call(client, fake_time.policy(attempts=3))
    error = raised.value
    assert len(seen) == 3
    assert (error.call, error.customer_id, error.status, error.code) == (
        CALL,
        CUSTOMER,
        503,
        "unavailable",
    )
    text = str(error)
    assert "3 attempt" in text
    assert "portal is restarting" in text
    assert CALL in text
    assert CUSTOMER in text


def test_total_seconds_bounds_the_retries_before_attempts_run_out(fake_time: FakeTime) -> None:
    client, seen = scripted([sm_error(429, "rate_limited", "wait", **{"Retry-After": "4"})] * 100)
    with pytest.raises(TransientError):
        call(client, fake_time.policy(attempts=100, total_seconds=10.0))
    # Waits of 4s fit twice in 10s; a third would end at 12s, past the budget, so it is not taken.
    assert fake_time.waits == [4.0, 4.0]
    assert len(seen) == 3


def test_a_retry_after_longer_than_the_budget_gives_up_at_once(fake_time: FakeTime) -> None:
    client, seen = scripted([sm_error(429, "rate_limited", "wait", **{"Retry-After": "50"})])
    with pytest.raises(TransientError) as raised:
        call(client, fake_time.policy(total_seconds=10.0))
    assert fake_time.waits == []
    assert len(seen) == 1
    assert raised.value.status == 429


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (409, "conflict"),
        (422, "unprocessable"),
        (501, "not_implemented"),
    ],
)
def test_permanent_statuses_raise_at_once_with_the_server_message(
    fake_time: FakeTime, status: int, code: str
) -> None:
    client, seen = scripted([sm_error(status, code, f"the server explains {status}")])
    with pytest.raises(PermanentError) as raised:
        call(client, fake_time.policy())
    assert len(seen) == 1
    assert fake_time.waits == []
    assert (raised.value.status, raised.value.code, raised.value.call) == (status, code, CALL)
    assert f"the server explains {status}" in str(raised.value)


def test_passthrough_status_is_returned_to_the_caller(fake_time: FakeTime) -> None:
    client, _ = scripted([sm_error(401, "unauthorized", "token expired")])
    assert call(client, fake_time.policy(), passthrough=(401,)).status_code == 401


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.PoolTimeout("pool exhausted"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
def test_timeouts_and_transport_errors_are_transient(
    fake_time: FakeTime, failure: Exception
) -> None:
    client, seen = scripted([failure, ok()])
    assert call(client, fake_time.policy()).status_code == 200
    assert len(seen) == 2


def test_exhausted_timeouts_raise_transient_error_not_retry_error(fake_time: FakeTime) -> None:
    client, _ = scripted([httpx.ReadTimeout("read timed out")] * 2)
    with pytest.raises(TransientError) as raised:
        call(client, fake_time.policy(attempts=2))
    assert "ReadTimeout" in str(raised.value)
    assert isinstance(raised.value.__cause__, httpx.ReadTimeout)


def test_a_misconfigured_url_scheme_is_permanent(fake_time: FakeTime) -> None:
    client, seen = scripted([httpx.UnsupportedProtocol("no such scheme")])
    with pytest.raises(PermanentError):
        call(client, fake_time.policy())
    assert len(seen) == 1


def test_each_retry_logs_one_warning_with_call_customer_attempt_and_wait(
    fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = scripted([sm_error(503, "unavailable", "down")] * 2 + [ok()])
    caplog.set_level(logging.WARNING, logger="sfsync.adapters.http")
    call(client, fake_time.policy())
    warnings = [r for r in caplog.records if r.name == "sfsync.adapters.http"]
    assert len(warnings) == 2
    first = warnings[0].getMessage()
    assert CALL in first
    assert CUSTOMER in first
    assert "attempt 1/5" in first
    assert "retrying in" in first


def test_a_200_that_is_not_json_is_a_malformed_response() -> None:
    response = httpx.Response(200, content=b"<html>maintenance</html>")
    with pytest.raises(PermanentError) as raised:
        parse_json(response, call=CALL, customer_id=CUSTOMER)
    assert "malformed response" in str(raised.value)
    assert CALL in str(raised.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempts": 0},
        {"total_seconds": 0},
        {"initial_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"max_retry_after_s": -1},
    ],
)
def test_retry_policy_rejects_nonsense(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**overrides)


def test_new_http_client_has_explicit_timeouts_and_no_redirects() -> None:
    with new_http_client(timeout_s=3.0, connect_timeout_s=1.5, max_connections=7) as client:
        assert client.timeout == httpx.Timeout(3.0, connect=1.5)
        assert client.follow_redirects is False


def test_new_http_client_uses_the_given_transport() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(204))
    with new_http_client(transport=transport) as client:
        assert client.get("http://anything.test/").status_code == 204


def test_every_answer_and_retry_is_counted_in_the_metrics(fake_time: FakeTime) -> None:
    from adapters.metrics import default_metrics

    registry = default_metrics().registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = (
        sample("sfsync_http_requests_total", api="sm", status="503"),
        sample("sfsync_http_requests_total", api="sm", status="200"),
        sample("sfsync_http_retries_total", api="sm"),
    )
    client, _ = scripted([sm_error(503, "unavailable", "down"), ok()])
    call(client, fake_time.policy())
    after = (
        sample("sfsync_http_requests_total", api="sm", status="503"),
        sample("sfsync_http_requests_total", api="sm", status="200"),
        sample("sfsync_http_retries_total", api="sm"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
