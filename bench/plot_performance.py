"""Plots the measured results in docs/performance/ as PNG files next to them (matplotlib).

Reads every `*.json` there written by `bench/fleet_cycle.py --json` (documents with "fleets";
of each fleet size, the latest measurement by its "measured_at") and, if present,
`users_scaling.json` ({"rows": [{"users", "worker_s", "floor_s", ...}]}), and writes
`cycle_scaling.png`: cycle time against customers for each worker count, with the I/O floor of
the same total concurrency (dashed) and the sequential baseline (dotted); plus a second panel,
worker time against users in one customer, when users_scaling.json exists.
Needs the `bench` extra: pip install -e '.[bench]'.
Usage: python bench/plot_performance.py [--dir docs/performance]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "docs" / "performance"


def load_fleets(directory: Path) -> list[dict[str, Any]]:
    documents = [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]
    fleets: list[dict[str, Any]] = []
    # Oldest first (ISO 8601 UTC timestamps sort as text), so that later measurements win.
    for document in sorted(
        (d for d in documents if isinstance(d, dict) and "fleets" in d),
        key=lambda d: str(d.get("measured_at", "")),
    ):
        fleets.extend(document["fleets"])
    # One point per fleet size: the latest measurement of that size wins.
    by_size = {fleet["fleet"]["customers"]: fleet for fleet in fleets}
    return [by_size[size] for size in sorted(by_size)]


def plot_customers(axes: Any, fleets: list[dict[str, Any]]) -> None:
    cycles: dict[int, list[tuple[int, float]]] = defaultdict(list)
    floors: dict[int, list[tuple[int, float]]] = defaultdict(list)
    sequential: list[tuple[int, float]] = []
    for fleet in fleets:
        customers = fleet["fleet"]["customers"]
        sequential.append((customers, fleet["sequential"]["fleet_s"]))
        for run in fleet["cycles"]:
            cycles[run["workers"]].append((customers, run["seconds"]))
        for floor in fleet["floors"]:
            floors[floor["workers"]].append((customers, floor["seconds"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, workers in enumerate(sorted(cycles)):
        colour = colours[index % len(colours)]
        xs, ys = zip(*sorted(cycles[workers]), strict=True)
        axes.plot(xs, ys, "o-", color=colour, label=f"cycle, {workers} worker process(es)")
        if floors.get(workers):
            fx, fy = zip(*sorted(floors[workers]), strict=True)
            label = f"I/O floor, same {workers} x threads"
            axes.plot(fx, fy, "x--", color=colour, alpha=0.7, label=label)
    sx, sy = zip(*sorted(sequential), strict=True)
    axes.plot(sx, sy, "k:", marker="s", label="sequential (original model)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("customers in the fleet")
    axes.set_ylabel("seconds, scheduler start to last report")
    axes.set_title("Fleet cycle through RabbitMQ (20 ms per API call)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")


def plot_users(axes: Any, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda row: row["users"])
    users = [row["users"] for row in rows]
    axes.plot(users, [row["worker_s"] for row in rows], "o-", label="worker")
    if all("floor_s" in row for row in rows):
        axes.plot(users, [row["floor_s"] for row in rows], "x--", label="I/O floor")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("users per side in one customer")
    axes.set_ylabel("seconds")
    axes.set_title("One big customer through the worker")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    fleets = load_fleets(args.dir)
    users_file = args.dir / "users_scaling.json"
    users_rows = json.loads(users_file.read_text())["rows"] if users_file.exists() else []
    if not fleets and not users_rows:
        parser.error(f"no results in {args.dir}")
    panels = [name for name, present in (("fleet", fleets), ("users", users_rows)) if present]
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for position, panel in enumerate(panels):
        if panel == "fleet":
            plot_customers(axes[0][position], fleets)
        else:
            plot_users(axes[0][position], users_rows)
    figure.tight_layout()
    out = args.dir / "cycle_scaling.png"
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
