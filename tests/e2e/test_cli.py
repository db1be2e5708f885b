"""The `sfsync` command as a user runs it: the demo, and `sync` exit codes on a failing customer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pika
import pytest

from adapters.topology import Topology
from simulators import Faults
from tests.conftest import delete_topology
from tests.e2e.conftest import settings_env


def sfsync(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SFSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "sfsync", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_runs_one_cycle_and_reports_every_enabled_customer() -> None:
    result = sfsync("demo", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    outcomes = {r["customer_id"]: r["outcome"] for r in document["reports"]}
    assert len(outcomes) == document["customers"] and not document["missing"]
    assert "held" in outcomes.values()  # the demo scenario includes a mass removal
    assert all(r["status"] == "accepted" for a in document["requests"] for r in a["items"])


def test_demo_prints_a_table_and_the_changes_for_people() -> None:
    result = sfsync("demo")
    assert result.returncode == 0, result.stderr
    assert "sync run run-" in result.stdout
    assert "to approve after review: sfsync approve plan-" in result.stdout
    assert "Services Manager now:" in result.stdout


def test_sync_exits_1_when_a_customer_fails_and_still_reports_the_others(
    start_fleet, fleet, tmp_path: Path
) -> None:
    broken = next(c for c in fleet.customers if c.sharefile_enabled)
    sims = start_fleet(
        sharefile_faults=Faults(timeout_customers=frozenset({broken.subdomain}), timeout_s=2)
    )
    env = settings_env(
        sims,
        tmp_path,
        SFSYNC_HTTP_TIMEOUT_S="0.5",
        SFSYNC_HTTP_ATTEMPTS="1",
        SFSYNC_MAX_ATTEMPTS="1",
    )
    result = sfsync("sync", "--json", env=env)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    failed = [r["customer_id"] for r in document["reports"] if r["outcome"] == "failed"]
    assert failed == [broken.id]
    assert len(document["reports"]) == document["customers"]


def test_sync_dry_run_with_chosen_customers(start_fleet, fleet, tmp_path: Path) -> None:
    sims = start_fleet()
    chosen = [c.id for c in fleet.customers if c.sharefile_enabled][:3]
    args = [a for c in chosen for a in ("--customer", c)]
    result = sfsync("sync", "--dry-run", "--json", *args, env=settings_env(sims, tmp_path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert sorted(r["customer_id"] for r in document["reports"]) == sorted(chosen)
    assert all(r["dry_run"] for r in document["reports"]) and document["requests"] == []
    assert sims.submissions() == []


def test_a_bad_setting_stops_sync_before_any_work(tmp_path: Path) -> None:
    result = sfsync("sync", env={"SFSYNC_MAX_DEPROVISION_RATIO": "1.5"})
    assert result.returncode == 2
    assert "SFSYNC_MAX_DEPROVISION_RATIO" in result.stderr


@pytest.mark.broker
def test_the_demo_on_a_shared_broker_keeps_to_queues_of_its_own(
    amqp_url: str, topology: Topology
) -> None:
    # With the deployment's prefix, the demo's 1 s retry queue made every later role on that
    # prefix fail to declare it (inequivalent x-message-ttl), and a running deployment's
    # workers would have taken the simulated customers' commands.
    result = sfsync(
        "demo", "--broker", amqp_url, "--json", "--no-audit", env={"SFSYNC_PREFIX": topology.prefix}
    )
    demo = Topology(prefix=f"{topology.prefix}-demo")
    try:
        assert result.returncode == 0, result.stderr
        assert not json.loads(result.stdout)["missing"]
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            connection.channel().queue_declare(demo.sync_queue, passive=True)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                connection.channel().queue_declare(topology.sync_queue, passive=True)
        finally:
            connection.close()
    finally:
        delete_topology(amqp_url, demo)
