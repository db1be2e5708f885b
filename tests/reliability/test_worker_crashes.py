"""Worker processes SIGKILLed again and again mid-cycle: nothing lost, nothing done twice."""

from __future__ import annotations

import pytest

from simulators import Faults, generate_fleet
from tests.e2e.conftest import settings_env, settings_for
from tests.reliability.conftest import (
    assert_exact_end_state,
    cycle,
    enabled_ids,
    eventually,
    queue_depth,
    wait_consuming,
)

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

CUSTOMERS = 500
KILLS = 3
# A killed worker must have had work in hand: it has planned this many customers since it started
# (and, with a prefetch above its concurrency, holds more than that unacknowledged).
PLANNED_BEFORE_KILL = 12


def test_a_worker_killed_three_times_mid_cycle_loses_and_doubles_nothing(
    start_sims, tmp_path, amqp_url, topology, amqp_env, processes
) -> None:
    fleet = generate_fleet(CUSTOMERS, median_users=8, max_users=100, drift=0.05, seed=23)
    # ShareFile latency keeps every worker busy with several customers at any moment.
    sims = start_sims(fleet, sharefile_faults=Faults(latency_ms=60))
    processes.env.update(settings_env(sims, tmp_path, SFSYNC_CONCURRENCY="6", **amqp_env))
    steady = processes.start("worker")
    victim = processes.start("worker")
    wait_consuming(amqp_url, topology.sync_queue, 2)
    settings = settings_for(sims, tmp_path, **amqp_env)

    with cycle(settings, submitter=True) as run:
        run.start()
        for _ in range(KILLS):
            eventually(lambda v=victim: v.log().count("planned ") >= PLANNED_BEFORE_KILL, 60)
            # Commands still queued: the victim's prefetch window is full, so it dies holding
            # unacknowledged commands that RabbitMQ must hand to someone else.
            assert queue_depth(amqp_url, topology.sync_queue) > 0
            victim.kill()
            assert not run.tracker.progress().done
            victim = processes.start("worker")
            wait_consuming(amqp_url, topology.sync_queue, 2)
        assert run.tracker.wait(180), run.tracker.progress()
        result = run.tracker.result

    # Every enabled customer reported once per run after dedup; redeliveries are counted, shown.
    assert set(result.reports) == enabled_ids(fleet)
    assert len(result.reports) >= CUSTOMERS * 0.9
    assert not result.failed and not result.failed_requests
    planned = processes.logs().count("planned ")
    print(f"{KILLS} kills: {planned} plans for {len(result.reports)} customers,", end=" ")
    print(f"{result.duplicate_reports} duplicate reports")
    # The steady worker never died; the victims died by SIGKILL (-9), the survivors still run.
    assert steady.proc.poll() is None
    assert [p.proc.returncode for p in processes.started if p.proc.poll() is not None] == [
        -9
    ] * KILLS
    assert_exact_end_state(sims, fleet)
    # Every request of every (latest) report was answered. Not equality: a command redelivered
    # after its requests were applied is planned again against SM's new state, and the tracker
    # keeps that later report, whose requests may be fewer (or none) than those answered.
    assert {r for rep in result.reports.values() for r in rep.request_ids} <= set(result.answers)
