"""Per-role Prometheus metrics: recorded through the small API, scraped over HTTP from /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import metrics
from adapters.metrics import Metrics, start_metrics_server, stop_metrics_server


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    """A fresh Metrics served on a free loopback port; yields it and its /metrics URL."""
    fresh = Metrics()
    port = start_metrics_server(0, addr="127.0.0.1", metrics=fresh)
    yield fresh, f"http://127.0.0.1:{port}/metrics"
    stop_metrics_server(port)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_message_outcomes_are_counted_by_type_and_outcome(served: tuple[Metrics, str]) -> None:
    recorded, url = served
    recorded.message_outcome("sync.command", "acked", 0.2)
    recorded.message_outcome("sync.command", "acked", 0.4)
    recorded.message_outcome("provisioning.requested", "parked", 1.5)
    recorded.message_outcome("provisioning.requested", "retried")
    samples = scrape(url)
    total = "sfsync_messages_total"
    assert samples[(total, (("outcome", "acked"), ("type", "sync.command")))] == 2
    assert samples[(total, (("outcome", "parked"), ("type", "provisioning.requested")))] == 1
    assert samples[(total, (("outcome", "retried"), ("type", "provisioning.requested")))] == 1
    seconds = "sfsync_message_handling_seconds"
    assert samples[(f"{seconds}_count", (("type", "sync.command"),))] == 2
    assert samples[(f"{seconds}_sum", (("type", "sync.command"),))] == pytest.approx(0.6)
    assert samples[(f"{seconds}_bucket", (("le", "0.25"), ("type", "sync.command")))] == 1
    # Without a duration only the counter moves.
    assert samples[(f"{seconds}_count", (("type", "provisioning.requested"),))] == 1


def test_unknown_message_types_share_one_label_value(served: tuple[Metrics, str]) -> None:
    recorded, url = served
    recorded.message_outcome("garbage.1", "parked")
    recorded.message_outcome(None, "parked")
    samples = scrape(url)
    assert samples[("sfsync_messages_total", (("outcome", "parked"), ("type", "unknown")))] == 2
    assert not any(dict(labels).get("type") == "garbage.1" for _name, labels in samples)


def test_a_stream_of_unknown_types_is_counted_without_being_remembered() -> None:
    recorded = Metrics()
    for n in range(1000):
        recorded.message_outcome(f"garbage.{n}", "parked")
    recorded.message_outcome("sync.command", "acked")

    # Only the known type's series is cached: garbage off the wire must not grow memory.
    assert len(recorded._children) == 1
    value = recorded.registry.get_sample_value
    assert value("sfsync_messages_total", {"type": "unknown", "outcome": "parked"}) == 1000


def test_http_calls_are_counted_by_api_and_status_with_their_duration(
    served: tuple[Metrics, str],
) -> None:
    recorded, url = served
    recorded.http_call("sm", 200, 0.05)
    recorded.http_call("sharefile", 429, 0.01)
    recorded.http_call("sharefile", None, 5.0)
    recorded.http_retry("sharefile")
    with recorded.timed_http("sm") as call:
        call.status = 503
    samples = scrape(url)
    requests = "sfsync_http_requests_total"
    assert samples[(requests, (("api", "sm"), ("status", "200")))] == 1
    assert samples[(requests, (("api", "sm"), ("status", "503")))] == 1
    assert samples[(requests, (("api", "sharefile"), ("status", "429")))] == 1
    assert samples[(requests, (("api", "sharefile"), ("status", "error")))] == 1
    assert samples[("sfsync_http_request_seconds_count", (("api", "sm"),))] == 2
    assert samples[("sfsync_http_request_seconds_count", (("api", "sharefile"),))] == 2
    assert samples[("sfsync_http_retries_total", (("api", "sharefile"),))] == 1


def test_a_timed_http_call_that_raises_is_recorded_as_an_error(
    served: tuple[Metrics, str],
) -> None:
    recorded, url = served
    with pytest.raises(httpx.ConnectTimeout), recorded.timed_http("sharefile"):
        raise httpx.ConnectTimeout("no answer")
    samples = scrape(url)
    assert samples[("sfsync_http_requests_total", (("api", "sharefile"), ("status", "error")))] == 1


def test_plans_count_items_by_action_and_held_plans(served: tuple[Metrics, str]) -> None:
    recorded, url = served
    recorded.plan(provision=3, deprovision=1)
    recorded.plan(provision=1, held=30)
    samples = scrape(url)
    assert samples[("sfsync_plan_items_total", (("action", "provision"),))] == 4
    assert samples[("sfsync_plan_items_total", (("action", "deprovision"),))] == 1
    assert samples[("sfsync_plan_items_total", (("action", "held"),))] == 30
    assert samples[("sfsync_held_plans_total", ())] == 1


def test_exposition_text_names_every_metric_with_its_help_and_type(
    served: tuple[Metrics, str],
) -> None:
    recorded, url = served
    recorded.message_outcome("sync.command", "acked", 0.1)
    text = httpx.get(url, timeout=10).text
    assert 'sfsync_messages_total{outcome="acked",type="sync.command"} 1.0' in text or (
        'sfsync_messages_total{type="sync.command",outcome="acked"} 1.0' in text
    )
    for name, kind in [
        ("sfsync_messages_total", "counter"),
        ("sfsync_message_handling_seconds", "histogram"),
        ("sfsync_http_requests_total", "counter"),
        ("sfsync_http_request_seconds", "histogram"),
        ("sfsync_http_retries_total", "counter"),
        ("sfsync_plan_items_total", "counter"),
        ("sfsync_held_plans_total", "counter"),
    ]:
        assert f"# TYPE {name} {kind}" in text
        assert f"# HELP {name} " in text


def test_module_functions_record_into_the_process_metrics_served_by_default() -> None:
    labels = {"type": "sync.held", "outcome": "acked"}
    start = metrics.default_metrics().registry.get_sample_value("sfsync_messages_total", labels)
    metrics.message_outcome("sync.held", "acked", 0.01)
    metrics.http_call("sm", 201, 0.02)
    metrics.http_retry("sm")
    metrics.plan(deprovision=2)
    port = start_metrics_server(0, addr="127.0.0.1")
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        stop_metrics_server(port)
    assert samples[("sfsync_messages_total", (("outcome", "acked"), ("type", "sync.held")))] == (
        (start or 0) + 1
    )
    assert samples[("sfsync_http_requests_total", (("api", "sm"), ("status", "201")))] >= 1
    # The process registry also carries the standard process metrics.
    assert any(name == "process_cpu_seconds_total" for name, _labels in samples)


def test_two_metrics_objects_do_not_share_values() -> None:
    first, second = Metrics(), Metrics()
    first.http_retry("sm")
    name, labels = "sfsync_http_retries_total", {"api": "sm"}
    assert first.registry.get_sample_value(name, labels) == 1
    assert second.registry.get_sample_value(name, labels) is None
