"""Both APIs misbehave (5xx, 429 with Retry-After, latency spikes) and one customer's ShareFile
never answers: the healthy customers converge exactly, the broken one fails alone, once."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet

import pytest

from adapters.topology import ATTEMPT_HEADER, REASON_HEADER, Topology
from domain.ports import EmployeeFeed, ShareFilePort
from domain.records import Customer
from domain.report import Outcome
from sfsync.bootstrap import build_clients
from simulators import Faults, generate_fleet
from tests.e2e.conftest import settings_for
from tests.reliability.conftest import cycle, drain, enabled_ids, queue_depth

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

MAX_ATTEMPTS = 3


class CountingShareFile:
    """The real ShareFile client, counting how often each customer's employees are asked for:
    once per handling of that customer's command."""

    def __init__(self, inner: ShareFilePort) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def employees(
        self, customer: Customer, *, known: AbstractSet[str] = frozenset()
    ) -> EmployeeFeed:
        with self._lock:
            self.calls[customer.id] += 1
        return self.inner.employees(customer, known=known)


@pytest.fixture
def broken_clients(start_sims, tmp_path, amqp_env) -> Iterator[tuple]:
    fleet = generate_fleet(60, median_users=8, max_users=100, drift=0.05, seed=47)
    broken = next(c for c in fleet.customers if c.sharefile_enabled and c.sm_users)
    sims = start_sims(
        fleet,
        sm_faults=Faults(
            latency_ms=2, error_rate=0.1, throttle_rate=0.05, retry_after_s=0.2, seed=1
        ),
        sharefile_faults=Faults(
            latency_ms=2,
            latency_jitter_ms=250,
            error_rate=0.1,
            retry_after_s=0.2,
            timeout_customers=frozenset({broken.subdomain}),
            timeout_s=2,
            seed=2,
        ),
    )
    settings = settings_for(
        sims,
        tmp_path,
        SFSYNC_HTTP_TIMEOUT_S="0.5",
        SFSYNC_HTTP_ATTEMPTS="4",
        SFSYNC_HTTP_TOTAL_S="2.5",
        SFSYNC_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        SFSYNC_RETRY_DELAY_S="0.2",
        **amqp_env,
    )
    clients = build_clients(settings, need_sharefile=True)
    assert clients.sharefile is not None
    try:
        yield fleet, broken, sims, settings, clients.sm, CountingShareFile(clients.sharefile)
    finally:
        clients.close()


def test_flaky_apis_converge_and_the_customer_that_always_times_out_is_parked_after_3_attempts(
    broken_clients, amqp_url, topology: Topology
) -> None:
    fleet, broken, sims, settings, sm, sharefile = broken_clients
    overrides = {"sm": sm, "sharefile": sharefile}
    with cycle(settings, worker=True, submitter=True, overrides=overrides) as run:
        run.start()
        assert run.tracker.wait(120), run.tracker.progress()
        result = run.tracker.result

    # The broken customer: one sync.failed report, after exactly MAX_ATTEMPTS handlings.
    assert [r.customer_id for r in result.failed] == [broken.id]
    report = result.reports[broken.id]
    assert report.outcome is Outcome.FAILED
    assert "tim" in (report.error or "").lower()  # "timed out" / "timeout"
    assert sharefile.calls[broken.id] == MAX_ATTEMPTS
    # ... and parked once, with the reason in its headers; nothing else is parked.
    sync_queue = topology.sync_queue
    [(body, headers)] = drain(amqp_url, topology.dead_queue(sync_queue))
    assert json.loads(body)["payload"]["customer_id"] == broken.id
    assert headers[REASON_HEADER].startswith(f"gave up after {MAX_ATTEMPTS} attempts")
    # The header counts the failures before the last handling (see tests/unit/consumers).
    assert headers[ATTEMPT_HEADER] == MAX_ATTEMPTS
    # It cannot loop: nothing waits for a retry, nothing is left to consume.
    assert queue_depth(amqp_url, topology.retry_queue(sync_queue)) == 0
    assert queue_depth(amqp_url, sync_queue) == 0
    assert sharefile.calls[broken.id] == MAX_ATTEMPTS

    # The healthy customers converged despite the faults, each handled to completion.
    assert set(result.reports) == enabled_ids(fleet)
    assert not result.failed_requests
    healthy = {c: s for c, s in fleet.expected.items() if c != broken.id}
    assert {c: s for c, s in sims.sm_states().items() if c != broken.id} == healthy
    assert sims.duplicate_effective_submissions() == 0
    retried = sum(1 for c, n in sharefile.calls.items() if c != broken.id and n > 1)
    print(f"healthy customers retried through the retry queue: {retried}")
