"""What the benchmark scripts measure about their own process."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    Read from /proc (VmHWM), not from getrusage: Linux carries ru_maxrss across fork and exec, so
    a child started by a big parent would report the parent's peak as its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
