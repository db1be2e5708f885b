"""A worker process whose HTTP calls outlast two heartbeat intervals keeps its connection."""

from __future__ import annotations

import pytest

from simulators import Faults, generate_fleet
from tests.e2e.conftest import settings_env, settings_for
from tests.reliability.conftest import (
    RECONNECT_LINE,
    cycle,
    eventually,
    heartbeats,
    queue_depth,
    wait_consuming,
)

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

HEARTBEAT_S = 1
# Every ShareFile answer takes this long: one command is several of them, all on worker threads.
SHAREFILE_LATENCY_S = 3.0


def test_a_worker_busy_longer_than_two_heartbeats_keeps_its_connection_and_acks_once(
    start_sims, tmp_path, amqp_url, topology, amqp_env, processes, closer
) -> None:
    fleet = generate_fleet(3, median_users=6, max_users=12, drift=0.3, seed=13)
    target = next(c for c in fleet.customers if c.sharefile_enabled and c.sm_users)
    sims = start_sims(
        fleet,
        sharefile_faults=Faults(latency_ms=SHAREFILE_LATENCY_S * 1000),
        sharefile_page_size=None,
    )
    env = settings_env(sims, tmp_path, SFSYNC_HEARTBEAT_S=str(HEARTBEAT_S), **amqp_env)
    processes.env.update(env)
    worker = processes.start("worker")
    wait_consuming(amqp_url, topology.sync_queue, 1)
    eventually(lambda: len(closer.connections()) == 1, 30)
    [worker_connection] = closer.connections()
    # The worker really asked for 1 s heartbeats (RabbitMQ would close it after ~2 missed).
    assert heartbeats(topology)["sfsync-worker"] == HEARTBEAT_S
    settings = settings_for(sims, tmp_path, **amqp_env)

    with cycle(settings, submitter=True, customer_ids=[target.id]) as run:
        run.start()
        # Token + feed: at least 2 x 3 s in one handler, well past 2 heartbeat intervals.
        assert run.tracker.wait(60), run.tracker.progress()
        result = run.tracker.result

    log = worker.log()
    assert list(result.reports) == [target.id]
    assert result.duplicate_reports == 0
    # Acked once: planned once, nothing redelivered or left unacknowledged.
    assert log.count("planned ") == 1, log
    assert queue_depth(amqp_url, topology.sync_queue) == 0
    # RabbitMQ never closed the worker's connection: no reconnect, the same connection still up.
    assert not RECONNECT_LINE.search(log), log
    assert log.count("connecting to ") == 1, log
    assert worker_connection in closer.connections()
    assert worker.proc.poll() is None
    assert sims.sm_states()[target.id] == fleet.expected[target.id]
    assert sims.duplicate_effective_submissions() == 0
