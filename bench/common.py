"""What the benchmark scripts share: their own peak memory, cleaning up a bench topology,
writing a run's results, and which customers' feeds a worker reads twice (so do the floors)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika

from adapters.topology import Topology
from simulators import SHAREFILE_PAGE_SIZE, Scenario


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    Read from /proc (VmHWM), not from getrusage: Linux carries ru_maxrss across fork and exec, so
    a child started by a big parent would report the parent's peak as its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Delete a benchmark's queues and exchange from the broker."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for spec in topology.queues():
            connection.channel().queue_delete(spec.name)
        connection.channel().exchange_delete(topology.exchange)
    finally:
        connection.close()


def write_results(path: Path, benchmark: str, args: argparse.Namespace, **results: Any) -> None:
    """Write one run's results as JSON, with when, where and how it was measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": benchmark,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python", f"bench/{benchmark}.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **results,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def rereads_of(scenario: Scenario) -> frozenset[str]:
    """The customers whose ShareFile feed a worker reads twice: a feed of several pages, and a
    removal as absent in the plan (`SyncHandler._confirmed_absences`). In these fleets every
    removal is one as absent (a leaver, or an employee moved to Clients: the worker reads only
    the Employees feed) and none is held (a fleet keeps within the default guard; the
    big-customer benchmark lifts the guard)."""
    return frozenset(
        customer.id
        for customer in scenario.customers
        if customer.sharefile_enabled
        and len(customer.sharefile_employees) > SHAREFILE_PAGE_SIZE
        and any(
            user["sharefile"]["state"] == "provisioned"
            and scenario.expected[customer.id][user["id"]] == "not_provisioned"
            for user in customer.sm_users
        )
    )
