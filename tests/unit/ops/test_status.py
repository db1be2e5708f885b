"""`sfsync status` without a broker: management answers parsed, shown, and never leaking."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner
from rich.console import Console

from adapters.rabbitmq_management import ManagementClient, ManagementUnavailable
from adapters.topology import Topology
from sfsync.cli.ops import EXIT_CONFIG, EXIT_UNAVAILABLE, status
from sfsync.status import (
    SOURCE_MANAGEMENT,
    StatusUnavailable,
    collect_status,
    render_json,
    render_table,
)

PASSWORD = "mgmt-Pa55-7c1d"
MANAGEMENT_URL = f"http://ops:{PASSWORD}@rabbit.example:15672"

QUEUES = [
    {
        "name": "acme.sync",
        "type": "quorum",
        "messages_ready": 12,
        "messages_unacknowledged": 4,
        "consumers": 2,
        "message_stats": {
            "publish_details": {"rate": 3.5},
            "deliver_get_details": {"rate": 2.25},
        },
    },
    {"name": "acme.sync.dead", "messages_ready": 3, "messages_unacknowledged": 0, "consumers": 0},
    {"name": "acme.sync.retry", "messages_ready": 1, "messages_unacknowledged": 0, "consumers": 0},
    {"name": "acme.run.run-42", "messages_ready": 0, "messages_unacknowledged": 0, "consumers": 1},
    # Declared a moment ago: the stats interval has not filled its counts in yet.
    {"name": "acme.provisioning"},
    {"name": "other.sync", "messages_ready": 99},
    {"name": "acmeish.sync", "messages_ready": 99},
    # Another deployment whose prefix starts with this one's and a dot: not ours either.
    {"name": "acme.eu.sync.dead", "messages_ready": 7},
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def fake_management(
    answer: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request]
) -> Callable[[str, str], ManagementClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    return lambda url, vhost: ManagementClient(
        url, vhost=vhost, transport=httpx.MockTransport(handler)
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_management_answer_is_parsed_for_the_prefix_queues_only() -> None:
    seen: list[httpx.Request] = []
    report = collect_status(
        Topology(prefix="acme"),
        management_url=MANAGEMENT_URL,
        amqp_url=None,
        vhost="prod",
        management_client=fake_management(lambda _r: httpx.Response(200, json=QUEUES), seen),
    )
    assert report.source == SOURCE_MANAGEMENT and report.rates_available
    names = [row.name for row in report.queues]
    # Topology order first (work, retry, parking per work queue), then listener queues.
    assert names == [
        "acme.sync",
        "acme.sync.retry",
        "acme.sync.dead",
        "acme.provisioning",
        "acme.run.run-42",
    ]
    by_name = {row.name: row for row in report.queues}
    sync = by_name["acme.sync"]
    assert (sync.kind, sync.ready, sync.unacked, sync.consumers) == ("work", 12, 4, 2)
    assert (sync.publish_rate, sync.deliver_rate) == (3.5, 2.25)
    assert by_name["acme.sync.dead"].kind == "parking" and by_name["acme.sync.dead"].parked == 3
    assert by_name["acme.run.run-42"].kind == "listener"
    fresh = by_name["acme.provisioning"]
    assert (fresh.ready, fresh.unacked, fresh.publish_rate) == (None, None, 0.0)
    assert report.parked == 3

    [request] = seen
    assert request.url.path == "/api/queues/prod"
    assert request.url.userinfo == b""
    assert request.headers["authorization"].startswith("Basic ")
    assert report.source_url == "http://rabbit.example:15672"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (httpx.Response(401, json={"error": "not_authorised"}), "refused the credentials"),
        (httpx.Response(200, text="<html>not the API</html>"), "not JSON"),
        (httpx.Response(503), "answered with an error"),
    ],
)
def test_an_unusable_management_answer_says_why_without_the_password(
    answer: httpx.Response, why: str
) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(StatusUnavailable) as raised:
        collect_status(
            Topology(prefix="acme"),
            management_url=MANAGEMENT_URL,
            amqp_url=None,
            management_client=fake_management(lambda _r: answer, seen),
        )
    assert why in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_the_client_reports_an_unreachable_api_as_unavailable() -> None:
    client = ManagementClient(f"http://guest:{PASSWORD}@127.0.0.1:{closed_port()}")
    with pytest.raises(ManagementUnavailable) as raised, client:
        client.queues("acme")
    assert "ConnectError" in str(raised.value) and PASSWORD not in str(raised.value)


def rendered(answer: list[dict[str, object]], width: int = 160) -> tuple[str, dict[str, object]]:
    report = collect_status(
        Topology(prefix="acme"),
        management_url=MANAGEMENT_URL,
        amqp_url=None,
        management_client=fake_management(lambda _r: httpx.Response(200, json=answer), []),
    )
    out = io.StringIO()
    render_table(report, Console(file=out, width=width, color_system=None))
    return out.getvalue(), json.loads(render_json(report))


def test_queue_names_are_never_shortened_in_a_narrow_terminal() -> None:
    table, data = rendered(QUEUES, width=80)
    names = [row["name"] for row in data["queues"]]  # type: ignore[union-attr]
    assert "acme.provisioning" in names
    assert all(name in table for name in names), table


def test_the_table_marks_parked_messages_and_names_the_source() -> None:
    table, data = rendered(QUEUES)
    assert "parked" in table
    assert "WARNING: 3 message(s) parked in acme.sync.dead" in table
    assert "source: management-api at http://rabbit.example:15672" in table
    assert PASSWORD not in table
    assert data["parked"] == 3 and data["source"] == "management-api"
    assert data["rates_available"] is True
    rows = {row["name"]: row for row in data["queues"]}  # type: ignore[union-attr]
    assert rows["acme.sync.dead"]["parked"] == 3
    assert rows["acme.sync"]["publish_rate"] == 3.5


def test_no_warning_when_nothing_is_parked() -> None:
    table, data = rendered([q for q in QUEUES if q["name"] != "acme.sync.dead"])
    assert "WARNING" not in table
    assert data["parked"] == 0


def test_status_command_needs_rabbitmq_settings() -> None:
    result = CliRunner().invoke(status, [])
    assert result.exit_code == EXIT_CONFIG
    assert "SFSYNC_MANAGEMENT_URL" in result.output


def test_status_command_exits_1_when_nothing_answers_and_prints_no_credentials() -> None:
    result = CliRunner().invoke(
        status,
        ["--json"],
        env={
            "SFSYNC_MANAGEMENT_URL": f"http://ops:{PASSWORD}@127.0.0.1:{closed_port()}",
            "SFSYNC_BROKER_URL": f"amqp://ops:{PASSWORD}@127.0.0.1:{closed_port()}/",
        },
    )
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert "management API unavailable" in result.output
    assert "RabbitMQ did not answer" in result.output
    assert PASSWORD not in result.output


def test_audit_role_queues_count_as_work_retry_and_parking() -> None:
    audit = [
        {"name": "acme.audit", "messages_ready": 5, "messages_unacknowledged": 0, "consumers": 1},
        {"name": "acme.audit.dead", "messages_ready": 1, "messages_unacknowledged": 0},
    ]
    report = collect_status(
        Topology(prefix="acme"),
        management_url=MANAGEMENT_URL,
        amqp_url=None,
        management_client=fake_management(lambda _r: httpx.Response(200, json=QUEUES + audit), []),
    )
    kinds = {row.name: row.kind for row in report.queues}
    assert kinds["acme.audit"] == "work" and kinds["acme.audit.dead"] == "parking"
    assert report.parked == 3 + 1
