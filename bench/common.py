"""What the benchmark scripts share: their own peak memory, and cleaning up a bench topology."""

from __future__ import annotations

from pathlib import Path

import pika

from adapters.topology import Topology


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
