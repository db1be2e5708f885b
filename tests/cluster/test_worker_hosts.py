"""A sync cycle with three worker hosts (network namespaces) against a 3-node cluster, with the
failures of such a deployment; every run must end in the fleet's exact expected state.

The scheduler, the run tracker and the submitter run in the test process, on node 1 (the run's
listener queue is a classic queue: it lives on one node). Workers get every node's URL and pick
one at random. Each test prints what it measured; docs/deployment.md quotes the figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.topology import Topology
from consumers.runner import default_headroom
from sfsync.bootstrap import build_broker
from sfsync.settings import Settings
from simulators import Faults, Scenario, SimulatorServers, generate_fleet
from tests.cluster.conftest import Cluster, HostProcess, HostProcesses, record
from tests.cluster.network import GATEWAY, Impairment, TestNetwork
from tests.e2e.conftest import settings_env, settings_for
from tests.reliability.conftest import (
    Cycle,
    assert_exact_end_state,
    consumer_count,
    cycle,
    enabled_ids,
    eventually,
    queue_depth,
    wait_consuming,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

CUSTOMERS = 250
CONCURRENCY = 4  # per worker; its prefetch is PREFETCH
PREFETCH = CONCURRENCY + default_headroom(CONCURRENCY)
# Slow enough ShareFile answers that a cycle lasts long enough to break something in the middle.
SHAREFILE_LATENCY_MS = 120
HEARTBEAT_S = 2


@dataclass
class Deployment:
    """One test's deployment: simulators on the test network, settings for both sides."""

    fleet: Scenario
    sims: SimulatorServers
    settings: Settings  # the test process's roles: node 1 only
    topology: Topology
    cluster: Cluster


@pytest.fixture
def deploy(
    cluster: Cluster, cluster_topology: Topology, start_sims, host_processes, tmp_path: Path
):
    def make(seed: int) -> Deployment:
        fleet = generate_fleet(CUSTOMERS, median_users=8, max_users=80, drift=0.05, seed=seed)
        sims = start_sims(
            fleet,
            host=GATEWAY,  # reachable from the hosts, and from here
            sharefile_faults=Faults(latency_ms=SHAREFILE_LATENCY_MS),
        )
        host_processes.env.update(
            settings_env(
                sims,
                tmp_path,
                SFSYNC_BROKER_URL=cluster.urls(GATEWAY),
                SFSYNC_PREFIX=cluster_topology.prefix,
                SFSYNC_CONCURRENCY=str(CONCURRENCY),
                SFSYNC_HEARTBEAT_S=str(HEARTBEAT_S),
                SFSYNC_LOG_LEVEL="INFO",
            )
        )
        settings = settings_for(
            sims, tmp_path, SFSYNC_BROKER_URL=cluster.url(1), SFSYNC_PREFIX=cluster_topology.prefix
        )
        return Deployment(fleet, sims, settings, cluster_topology, cluster)

    return make


@contextmanager
def running_cycle(
    deployment: Deployment, network: TestNetwork, processes: HostProcesses
) -> Iterator[tuple[Cycle, list[HostProcess]]]:
    """The test's roles on node 1, then one worker per host, all consuming before the run."""
    with cycle(deployment.settings, submitter=True) as run:
        workers = [processes.start_on(host) for host in network.hosts]
        wait_consuming(deployment.cluster.url(1), deployment.topology.sync_queue, len(workers))
        yield run, workers


def worker_on(
    wanted: Callable[[int], bool],
    workers: list[HostProcess],
    processes: HostProcesses,
    deployment: Deployment,
) -> HostProcess:
    """A worker connected to a node that is `wanted`. Workers choose nodes at random: restart
    one until some worker is on such a node (none is, with 3 workers: p = 1/27 or 8/27)."""
    for _ in range(20):
        eventually(lambda: all(w.node() for w in workers), 30)
        found = [w for w in workers if wanted(w.node() or 0)]
        if found:
            return found[0]
        workers[0].proc.terminate()
        workers[0].proc.wait(30)
        workers[0] = processes.start_on(workers[0].host)
        wait_consuming(deployment.cluster.url(1), deployment.topology.sync_queue, len(workers))
    raise AssertionError("no worker ever connected to the wanted node")


def finish(run: Cycle, deployment: Deployment, started: float, seconds: float = 240) -> float:
    assert run.tracker.wait(seconds), run.tracker.progress()
    elapsed = time.monotonic() - started
    result = run.tracker.result
    assert set(result.reports) == enabled_ids(deployment.fleet)
    assert not result.failed and not result.failed_requests
    # Every request of the final reports was answered. (A command redelivered after its plan was
    # published is planned again, against SM's newer state: its earlier requests are answered
    # too, but the later report no longer names them.)
    assert {r for rep in result.reports.values() for r in rep.request_ids} <= set(result.answers)
    return elapsed


def test_a_cycle_over_three_worker_hosts_ends_exact(
    deploy, network: TestNetwork, host_processes: HostProcesses, cluster: Cluster
) -> None:
    deployment = deploy(seed=41)
    with running_cycle(deployment, network, host_processes) as (run, workers):
        # The broker sees each worker from its own host's address.
        peers = cluster.ctl(1, "list_connections", "peer_host", "client_properties")
        prefix = deployment.topology.prefix
        ours = {row.split("\t")[0] for row in peers.splitlines() if prefix in row}
        assert {h.address for h in network.hosts} <= ours, peers
        started = time.monotonic()
        run.start()
        elapsed = finish(run, deployment, started)
    assert_exact_end_state(deployment.sims, deployment.fleet)
    planned = [w.planned() for w in workers]
    assert all(planned), planned  # every host took part
    record(
        f"baseline: {CUSTOMERS} customers, 3 hosts x {CONCURRENCY}: cycle {elapsed:.1f}s, "
        f"plans per host {planned}, nodes used {sorted({w.node() for w in workers})}"
    )


def test_stopping_the_node_a_worker_uses_moves_it_to_another_node_mid_cycle(
    deploy, network: TestNetwork, host_processes: HostProcesses, cluster: Cluster
) -> None:
    deployment = deploy(seed=42)
    with running_cycle(deployment, network, host_processes) as (run, workers):
        # The test's own roles live on node 1: the victim is a worker on node 2 or 3.
        victim = worker_on(lambda node: node != 1, workers, host_processes, deployment)
        node = victim.node()
        assert node in (2, 3)
        started = time.monotonic()
        run.start()
        eventually(lambda: victim.planned() >= 5, 60)
        assert queue_depth(cluster.url(1), deployment.topology.sync_queue) > 0
        readies = victim.readies()
        stopped_at = time.monotonic()
        try:
            cluster.stop_node(node)
            stop_s = time.monotonic() - stopped_at
            eventually(lambda: victim.readies() > readies, 60, every=0.05)
            reconnect_s = time.monotonic() - stopped_at
            assert victim.node() not in (None, node)
            assert not run.tracker.progress().done, "the cycle ended before the failure"
            elapsed = finish(run, deployment, started)
        finally:
            cluster.start_node(node)
    assert_exact_end_state(deployment.sims, deployment.fleet)
    record(
        f"node stop: node {node} stopped mid-cycle (rabbitmqctl stop took {stop_s:.1f}s); its "
        f"worker was consuming on node {victim.node()} {reconnect_s:.1f}s after the stop began; "
        f"cycle {elapsed:.1f}s; exact end state, 0 duplicate effective submissions"
    )


def test_killing_the_quorum_leader_node_keeps_the_queues_serving_from_a_new_leader(
    deploy, network: TestNetwork, host_processes: HostProcesses, cluster: Cluster
) -> None:
    deployment = deploy(seed=43)
    # A queue's leader is where it was first declared (client-local): declare them on node 3.
    settings_on_3 = deployment.settings.model_copy(update={"broker_url": [cluster.url(3)]})
    declarer = build_broker(settings_on_3, name="sfsync-declare-on-3")
    declarer.start()
    declarer.close()
    queues = (deployment.topology.sync_queue, deployment.topology.provisioning_queue)
    before = cluster.queue_leaders(1, deployment.topology.prefix)
    for queue in queues:
        leader, members = before[queue]
        assert leader == "sfsync-c3@localhost"
        assert sorted(members) == [f"sfsync-c{n}@localhost" for n in (1, 2, 3)]

    with running_cycle(deployment, network, host_processes) as (run, workers):
        on_3 = worker_on(lambda node: node == 3, workers, host_processes, deployment)
        readies = on_3.readies()
        started = time.monotonic()
        run.start()
        eventually(lambda: run.reported() >= 20, 60)
        planned = sum(w.planned() for w in workers)
        killed_at = time.monotonic()
        try:
            cluster.kill_node(3)
            # At most 3 x prefetch deliveries were in hand at the kill: a plan beyond those was
            # delivered after it, by the new leader. (Workers log each plan as it is made.)
            in_hand = len(workers) * PREFETCH
            eventually(
                lambda: sum(w.planned() for w in workers) > planned + in_hand, 90, every=0.05
            )
            serving_s = time.monotonic() - killed_at
            assert not run.tracker.progress().done, "the cycle ended before the failure"
            eventually(lambda: on_3.readies() > readies, 60)
            moved_s = time.monotonic() - killed_at
            assert on_3.node() in (1, 2)
            elapsed = finish(run, deployment, started)
            after = cluster.queue_leaders(1, deployment.topology.prefix)
        finally:
            cluster.start_node(3)
    for queue in queues:
        assert after[queue][0] in ("sfsync-c1@localhost", "sfsync-c2@localhost"), after
    assert_exact_end_state(deployment.sims, deployment.fleet)
    record(
        f"leader kill: node 3 (leader of every queue) SIGKILLed mid-cycle; new leaders "
        f"{sorted({after[q][0] for q in queues})}; fresh deliveries again {serving_s:.1f}s "
        f"after the kill; its worker consuming on node {on_3.node()} after {moved_s:.1f}s; "
        f"cycle {elapsed:.1f}s; exact end state, 0 duplicate effective submissions"
    )


def test_a_cut_host_link_hands_its_messages_to_the_others_and_the_host_never_doubles(
    deploy, network: TestNetwork, host_processes: HostProcesses, cluster: Cluster
) -> None:
    deployment = deploy(seed=44)
    host = network.hosts[0]
    with running_cycle(deployment, network, host_processes) as (run, workers):
        victim = workers[0]
        started = time.monotonic()
        run.start()
        eventually(lambda: victim.planned() >= 5, 60)
        readies = victim.readies()
        cut_at = time.monotonic()
        try:
            host.cut()
            # Mid-message: the broker still counts the victim's deliveries as unacknowledged.
            channels = cluster.ctl(1, "list_channels", "name", "messages_unacknowledged")
            unacked = sum(
                int(row.rsplit("\t", 1)[1])
                for row in channels.splitlines()
                if row.startswith(f"{host.address}:")
            )
            assert unacked > 0, channels
            sync_queue = deployment.topology.sync_queue
            eventually(lambda: consumer_count(cluster.url(1), sync_queue) == 2, 60, every=0.1)
            detected_s = time.monotonic() - cut_at
            # The whole run completes while the host is still cut off: whatever it held was
            # redelivered to the other hosts.
            elapsed = finish(run, deployment, started)
            assert victim.proc.poll() is None
        finally:
            host.reconnect()
        back_at = time.monotonic()
        eventually(lambda: victim.readies() > readies, 90, every=0.1)
        rejoin_s = time.monotonic() - back_at
        # Let the old worker finish what it held (SIGTERM: it completes its in-flight messages),
        # then let the submitter take whatever that published.
        assert host_processes.stop_all() == [0, 0, 0]
        eventually(lambda: queue_depth(cluster.url(1), deployment.topology.provisioning_queue) == 0)
    assert_exact_end_state(deployment.sims, deployment.fleet)
    replays = sum(1 for s in deployment.sims.submissions() if s["replayed"])
    record(
        f"link cut: host {host.address} cut holding {unacked} unacked; broker dropped it after "
        f"{detected_s:.1f}s (heartbeat {HEARTBEAT_S}s); run completed without it in {elapsed:.1f}s;"
        f" link back: worker reconnected in {rejoin_s:.1f}s; {replays} replayed submission(s), "
        f"0 duplicate effective submissions"
    )


def test_a_slowed_host_does_less_of_the_work_and_the_results_stay_exact(
    deploy, network: TestNetwork, host_processes: HostProcesses, tmp_path: Path
) -> None:
    deployment = deploy(seed=45)
    slow = network.hosts[0]
    impairment = Impairment(rate_kbit=256, drop_one_in=20)  # ~32 KB/s, 5% of packets lost
    slow.slow(impairment, tmp_path)
    try:
        with running_cycle(deployment, network, host_processes) as (run, workers):
            started = time.monotonic()
            run.start()
            elapsed = finish(run, deployment, started)
    finally:
        slow.unslow()
    assert_exact_end_state(deployment.sims, deployment.fleet)
    planned = [w.planned() for w in workers]
    others = sum(planned[1:]) / (len(planned) - 1)
    assert planned[0] < 0.6 * others, planned
    record(
        f"slowed host: {slow.address} at {impairment.rate_kbit} kbit/s with 1 packet in "
        f"{impairment.drop_one_in} dropped (tbf + BPF; no netem in this kernel): plans per host "
        f"{planned}; cycle {elapsed:.1f}s; exact end state"
    )
