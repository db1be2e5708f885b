"""No secret reaches a log record, a report, a parked message, an exception or the CLI's output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlparse

import httpx
import pika
import pytest

from adapters.broker import Outgoing
from adapters.credentials import CredentialStore
from adapters.http import RetryPolicy, new_http_client
from adapters.services_manager import ServicesManagerClient
from adapters.sharefile import ShareFileClient
from adapters.topology import Topology
from domain.errors import SfsyncError
from domain.records import Customer
from domain.report import Outcome
from sfsync.bootstrap import build_topology, running, track_run
from sfsync.oneshot import sync_once
from sfsync.settings import Settings, load_settings
from simulators import Faults, Scenario, SimulatorServers, generate_fleet
from simulators.sharefile_app import SharefileState
from tests.e2e.conftest import no_stray_settings, settings_env  # noqa: F401

SM_TOKEN = "SMTOKEN-rel-5b7e1c93d2"
CLIENT_SECRET = "CLSECRET-rel-0d4f2a8e6b"
PASSWORD = "PASSWD-rel-9c61e7b4aa"
# The credentials file's entry for one subdomain carries a wrong password: still a secret.
WRONG_PASSWORD = "WRONGPW-rel-3a8d5f2017"
CREDENTIALS = {
    "client_id": "sfsync-reliability",
    "client_secret": CLIENT_SECRET,
    "username": "api@reliability.example",
    "password": PASSWORD,
}
NOISY_LOGGERS = (
    "pika",
    "httpx",
    "httpcore",
    "urllib3",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.asgi",
    "sfsync",
)
POISON = b'{"type": "sync.command", "schema_version": 1, "payload": {"customer_id": "../x"}}'


@pytest.fixture
def scenario() -> Scenario:
    fleet = generate_fleet(8, median_users=10, max_users=40, drift=0.1, seed=7)
    return fleet.model_copy(update={"sm_token": SM_TOKEN, "sharefile_credentials": CREDENTIALS})


@pytest.fixture
def issued_tokens(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every access and refresh token the ShareFile simulator issues during the test."""
    tokens: set[str] = set()
    issue = SharefileState.issue

    def recording_issue(self: SharefileState, subdomain_key: str) -> tuple[str, str]:
        access, refresh = issue(self, subdomain_key)
        tokens.update((access, refresh))
        return access, refresh

    monkeypatch.setattr(SharefileState, "issue", recording_issue)
    return tokens


@pytest.fixture
def raised(monkeypatch: pytest.MonkeyPatch) -> list[SfsyncError]:
    """Every SfsyncError created during the test (raised, logged, put in a report or not)."""
    created: list[SfsyncError] = []
    init = SfsyncError.__init__

    def recording_init(self: SfsyncError, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(SfsyncError, "__init__", recording_init)
    return created


class Fixture:
    """The simulators with faults, and the customers that must fail, for one test."""

    def __init__(self, scenario: Scenario) -> None:
        enabled = [c for c in scenario.customers if c.sharefile_enabled]
        self.refused = enabled[0]  # its credentials entry has the wrong password
        self.hanging = enabled[1]  # its ShareFile never answers in time
        self.sims = SimulatorServers(
            scenario,
            # 429s and 503s on both sides, so that every retry path logs.
            sm_faults=Faults(throttle_rate=0.1, error_rate=0.1, retry_after_s=0.01, seed=3),
            sharefile_faults=Faults(
                error_rate=0.1,
                retry_after_s=0.01,
                timeout_customers=frozenset({self.hanging.subdomain}),
                timeout_s=2,
                seed=4,
            ),
            sharefile_page_size=7,
        )

    def env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        credentials = tmp_path / "credentials-with-a-wrong-password.json"
        wrong = {**CREDENTIALS, "password": WRONG_PASSWORD}
        credentials.write_text(json.dumps({"*": CREDENTIALS, self.refused.subdomain: wrong}))
        return settings_env(
            self.sims,
            tmp_path,
            SFSYNC_SHAREFILE_CREDENTIALS_FILE=str(credentials),
            SFSYNC_HTTP_TIMEOUT_S="0.5",
            SFSYNC_HTTP_ATTEMPTS="3",
            SFSYNC_MAX_ATTEMPTS="2",
            **extra,
        )


@pytest.fixture
def faulty(scenario: Scenario, issued_tokens: set[str]) -> Iterator[Fixture]:
    fixture = Fixture(scenario)
    with fixture.sims:
        yield fixture


def settings_from(env: dict[str, str]) -> Settings:
    return load_settings(**{k.removeprefix("SFSYNC_").lower(): v for k, v in env.items()})


def drain(amqp_url: str, queue: str) -> list[str]:
    texts: list[str] = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return texts
            texts += [body.decode("utf-8", "replace"), repr(properties.headers)]
    finally:
        connection.close()


def known_secrets(amqp_url: str, tokens: set[str]) -> set[str]:
    secrets = {SM_TOKEN, CLIENT_SECRET, PASSWORD, WRONG_PASSWORD, *tokens}
    url = urlparse(amqp_url)
    if url.password:
        # "guest" alone is too common a word to look for; the URL's user:password@ is not.
        secrets |= {amqp_url, f"{url.username}:{url.password}@"}
    return secrets


def leaks(texts: list[str], secrets: set[str]) -> list[tuple[str, str]]:
    found = []
    for text in texts:
        for secret in secrets:
            if secret in text:
                at = text.index(secret)
                found.append((secret, text[max(0, at - 80) : at + 80]))
    return found


def exception_texts(error: BaseException) -> list[str]:
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


@pytest.mark.broker
@pytest.mark.slow
def test_a_cycle_with_failures_retries_and_poison_never_shows_a_secret(
    faulty: Fixture,
    issued_tokens: set[str],
    raised: list[SfsyncError],
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in NOISY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    env = faulty.env(tmp_path, SFSYNC_BROKER_URL=amqp_url, SFSYNC_PREFIX=topology.prefix)
    settings = settings_from(env)
    names = build_topology(settings)
    texts: list[str] = []
    results = []
    with running(settings, worker=True, submitter=True, scheduler=True) as roles:
        assert roles.scheduler is not None
        roles.broker.publish(
            [
                Outgoing(key, POISON, "poison", "", "", exchange=None)
                for key in ("sync.command", "provisioning.requested")
            ]
        )
        for cycle in range(2):
            if cycle == 1:
                # Every access token is now refused: the workers renew with the refresh grant.
                faulty.sims.expire_tokens()
            run_id = f"run-secrets-{cycle}-{uuid.uuid4().hex[:6]}"
            tracker, listener = track_run(roles, settings, run_id)
            roles.scheduler.run_once(run_id=run_id, on_listed=tracker.expect)
            assert tracker.wait(90), tracker.progress()
            listener.stop()
            results.append(tracker.result)

    for result in results:
        failed = {r.customer_id for r in result.failed}
        assert {faulty.refused.id, faulty.hanging.id} <= failed
        assert any(r.outcome is not Outcome.FAILED for r in result.reports.values())
        texts += [r.model_dump_json() for r in result.reports.values()]
        texts += [a.model_dump_json() for a in result.answers.values()]
    texts += drain(amqp_url, names.dead_queue(names.sync_queue))
    texts += drain(amqp_url, names.dead_queue(names.provisioning_queue))

    # The run went through every path whose text could carry a secret.
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying in" in m for m in messages), "no HTTP retry was logged"
    assert any("re-authenticating" in m for m in messages), "no token renewal happened"
    assert any("parking undecodable" in m for m in messages), "the poison was not parked"
    # urllib3 carries the roles' HTTP calls (adapters.http.PooledTransport).
    assert {r.name.split(".")[0] for r in caplog.records} >= {"pika", "httpx", "urllib3"}
    assert len(issued_tokens) >= 4
    assert any(e.status == 401 for e in raised), "the wrong password was never refused"
    assert any("timed out" in str(e).lower() or "timeout" in str(e).lower() for e in raised)

    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args), repr(record.__dict__)]
        if record.exc_info and record.exc_info[1] is not None:
            texts += exception_texts(record.exc_info[1])
    texts.append(caplog.text)
    for error in raised:
        texts += exception_texts(error)

    assert leaks(texts, known_secrets(amqp_url, issued_tokens)) == []


def sfsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SFSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "sfsync", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.broker
@pytest.mark.slow
def test_the_sync_command_at_debug_level_prints_no_secret(
    faulty: Fixture,
    issued_tokens: set[str],
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
) -> None:
    env = faulty.env(
        tmp_path,
        SFSYNC_BROKER_URL=amqp_url,
        SFSYNC_PREFIX=topology.prefix,
        SFSYNC_LOG_LEVEL="DEBUG",
    )
    result = sfsync(env, "sync", "--json", "--timeout", "90")
    assert result.returncode == 1, result.stderr[-2000:]
    document = json.loads(result.stdout)
    failed = {r["customer_id"] for r in document["reports"] if r["outcome"] == "failed"}
    assert {faulty.refused.id, faulty.hanging.id} <= failed
    assert "DEBUG" in result.stderr and "retrying in" in result.stderr
    assert issued_tokens
    output = [result.stdout, result.stderr]
    assert leaks(output, known_secrets(amqp_url, issued_tokens)) == []


BROKER_PASSWORD = "BROKERPW-rel-77c2e9"


def test_a_mistyped_broker_url_is_refused_without_printing_its_password() -> None:
    result = sfsync({"SFSYNC_BROKER_URL": f"amqp//sfsync:{BROKER_PASSWORD}@rabbit:5672/"}, "sync")
    assert result.returncode == 2
    assert "SFSYNC_BROKER_URL" in result.stderr
    assert BROKER_PASSWORD not in result.stderr + result.stdout


def test_the_settings_object_does_not_show_the_broker_password() -> None:
    settings = load_settings(broker_url=f"amqp://sfsync:{BROKER_PASSWORD}@rabbit:5672/")
    assert BROKER_PASSWORD not in repr(settings) + str(settings)


# -- a token that cannot travel in a header must not travel into an error either ---------------

# What a secret file written with `echo` gives, and what a broken token endpoint may answer.
UNSENDABLE = ("\n", "\r\n", "\x00", " é")


@pytest.mark.parametrize("junk", UNSENDABLE, ids=["newline", "crlf", "nul", "non-ascii"])
def test_an_sm_token_that_cannot_be_sent_fails_the_run_without_showing_it(
    junk: str,
    scenario: Scenario,
    tmp_path: Path,
    raised: list[SfsyncError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with SimulatorServers(scenario) as sims:
        env = settings_env(sims, tmp_path, SFSYNC_SM_TOKEN=SM_TOKEN + junk)
        with pytest.raises(SfsyncError) as refused:
            sync_once(settings_from(env), timeout_s=30)
    texts = exception_texts(refused.value)
    assert "token" in str(refused.value)
    assert sims.submissions() == []
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    for error in raised:
        texts += exception_texts(error)
    assert leaks(texts, {SM_TOKEN}) == []


@pytest.mark.parametrize("junk", UNSENDABLE, ids=["newline", "crlf", "nul", "non-ascii"])
def test_an_issued_sharefile_token_that_cannot_be_sent_fails_the_customer_without_showing_it(
    junk: str,
    scenario: Scenario,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    raised: list[SfsyncError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    issued: set[str] = set()
    issue = SharefileState.issue

    def broken_issue(self: SharefileState, subdomain_key: str) -> tuple[str, str]:
        access, refresh = issue(self, subdomain_key)
        issued.update((access, refresh))
        return access[:10] + junk + access[10:], refresh

    monkeypatch.setattr(SharefileState, "issue", broken_issue)
    with SimulatorServers(scenario) as sims:
        result = sync_once(settings_from(settings_env(sims, tmp_path)), timeout_s=30)
    enabled = {c.id for c in scenario.customers if c.sharefile_enabled}
    assert {r.customer_id for r in result.failed} == enabled
    assert sims.submissions() == []
    texts = [r.model_dump_json() for r in result.reports.values()]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    for error in raised:
        texts += exception_texts(error)
    # Long enough to be unmistakable, short enough to be cut by the junk in neither half.
    pieces = {token[:10] + junk for token in issued} | {token[10:] for token in issued}
    assert leaks(texts, pieces | issued) == []


# -- a server that echoes what it was sent --------------------------------------------------------

SPACED_PASSWORD = "PASS  WORD\tREL-4e1c"  # whitespace inside: a line-shortener would reflow it


def echoing_sm(status: int, filler: int) -> ServicesManagerClient:
    """SM answering with an error message that repeats the bearer token after `filler` chars."""

    def handle(request: httpx.Request) -> httpx.Response:
        message = "x" * filler + " " + request.headers["Authorization"]
        return httpx.Response(status, json={"error": {"code": "unauthorized", "message": message}})

    http = new_http_client(transport=httpx.MockTransport(handle))
    return ServicesManagerClient(
        "http://sm.test/api/v1", SM_TOKEN, http=http, retry=RetryPolicy(attempts=1)
    )


def echoing_sharefile(filler: int) -> ShareFileClient:
    """A token endpoint refusing the grant with a description that repeats the password."""

    def handle(request: httpx.Request) -> httpx.Response:
        sent = request.content.decode()
        password = parse_qs(sent)["password"][0]
        described = "x" * filler + f" password {password} refused; the request was: {sent}"
        return httpx.Response(401, json={"error": "invalid_grant", "error_description": described})

    credentials = {**CREDENTIALS, "password": SPACED_PASSWORD}
    return ShareFileClient(
        CredentialStore.from_mapping({"*": credentials}),
        token_url_template="http://sf.test/{subdomain}/oauth/token",
        api_url_template="http://sf.test/{subdomain}/sf/v3/",
        http=new_http_client(transport=httpx.MockTransport(handle)),
        retry=RetryPolicy(attempts=1),
    )


def fragments(secret: str) -> set[str]:
    """The secret as sent, reflowed and form-encoded; whole, and the first 8 characters of each
    (what a cut at a length limit leaves)."""
    forms = {secret, " ".join(secret.split()), quote_plus(secret)}
    return forms | {form[:8] for form in forms}


# Fillers that put the secret well before, across (12 characters left by the cut at 297 for
# either prefix " Bearer " or " password "), and past the 300-character cut of server texts.
@pytest.mark.parametrize("filler", [10, 275, 277, 320])
def test_a_server_echoing_a_secret_never_gets_any_part_of_it_into_an_error(filler: int) -> None:
    texts = []
    for status in (401, 503):
        with pytest.raises(SfsyncError) as raised:
            list(echoing_sm(status, filler).list_customers())
        texts += exception_texts(raised.value)
    with pytest.raises(SfsyncError) as raised:
        list(echoing_sharefile(filler).employees(Customer(id="cust-1", subdomain="one")))
    texts += exception_texts(raised.value)
    secrets = fragments(SM_TOKEN) | fragments(SPACED_PASSWORD) | fragments(CLIENT_SECRET)
    assert leaks(texts, secrets) == []
