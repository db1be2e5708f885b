"""Benchmark: the CPU work of one customer's sync, in instructions, against the bare fetch.

The fleet benchmark's goal "a cycle within 1.5x the I/O floor" compares wall times on a shared
machine whose speed changes by more than the differences at stake (docs/performance.md). This
script measures what the product itself adds to the floor's work in a unit that does not
change with the machine: instructions executed, counted by valgrind's callgrind.

It generates the fleet of `bench/fleet_cycle.py` (same seed and shape), starts the simulators
(a forked process, no added latency, not under valgrind), and runs each stage below in a child
process under callgrind, one thread, over the first N enabled customers of the fleet, and again
over none: the difference over N is the instructions per customer (imports and set-up cancel
out). Stages, each doing more of what a worker does for a customer:

  floor      the I/O floor's loop: every page a worker fetches, with the same httpx client and
             transport, each answer JSON-decoded (`fleet_cycle.PageFetcher`)
  clients    the product's API clients fetching the same pages: the customer, the ShareFile
             employee feed (token, pages, users validated) and the Services Manager users
  reconcile  the same, with the users reconciled into a plan (`domain.reconcile`)
  handler    the sync worker's handler (`SyncHandler.handle`: the above plus the provisioning
             requests, the report, metrics and the envelopes), and each output's message body
             as the runner publishes it

Valgrind runs Python 30-80 times slower: the default (200 customers, 8 runs, two at a time)
takes a few minutes. Counts vary by up to about 0.5 % between runs of the same code (random
ids, clock reads, garbage collections).
Usage: python bench/cpu_work.py [--customers 200] [--fleet 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import write_results
from fleet_cycle import PageFetcher, settings_of, simulator

from adapters.broker import Outgoing
from adapters.http import new_http_client
from consumers.sync_worker import SyncHandler
from domain.messages import SyncCommand
from domain.reconcile import reconcile
from sfsync.bootstrap import build_clients, default_stamper
from simulators import generate_fleet

STAGES = ("floor", "clients", "reconcile", "handler")
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "bench", "consumers", "domain", "producers", "sfsync", "simulators")


def child(stage: str, count: int, config_file: Path) -> None:
    """One stage over the first `count` enabled customers (run under callgrind by the parent)."""
    config = json.loads(config_file.read_text())
    env = config["env"]
    if stage == "floor":
        with new_http_client(timeout_s=60) as http:
            fetcher = PageFetcher(http, env, config["sm_token"])
            for customer in fetcher.enabled_customers()[:count]:
                fetcher.fetch(customer)
        return

    settings = settings_of(env)
    clients = build_clients(settings, need_sharefile=True)
    assert clients.sharefile is not None
    policy = settings.policy()
    stamp = default_stamper()
    handler = SyncHandler(sm=clients.sm, sharefile=clients.sharefile, policy=policy, stamp=stamp)
    enabled = [c for c in clients.sm.list_customers() if c.sharefile_enabled][:count]
    for listed in enabled:
        if stage == "handler":
            command = stamp(SyncCommand(customer_id=listed.id, run_id="cpu"), correlation_id="cpu")
            for output in handler.handle(command):
                Outgoing.of(output)
            continue
        customer = clients.sm.get_customer(listed.id)
        feed = clients.sharefile.employees(customer)
        sharefile_users = list(feed)
        sm_users = clients.sm.list_users(listed.id)
        if stage == "clients":
            for _ in sm_users:
                pass
        else:
            reconcile(
                sm_users,
                sharefile_users,
                policy,
                customer_id=listed.id,
                sharefile_declared=feed.declared_count,
            )
    clients.close()


def instructions(stage: str, count: int, config_file: Path) -> int:
    """Instructions callgrind counted for a child process running `stage` over `count`."""
    command = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, __file__, "--child", stage, str(count), str(config_file)),
    ]
    bench = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (bench, os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{stage} x {count} failed (exit {done.returncode}):\n{done.stderr}")
    return int(found.group(1).replace(",", ""))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    print(f"generating {args.fleet:,} customers ...", file=sys.stderr)
    scenario = generate_fleet(
        args.fleet,
        seed=args.seed,
        median_users=args.median_users,
        drift=args.drift,
        large_share=args.large_share,
    )
    enabled = [c for c in scenario.customers if c.sharefile_enabled][: args.customers]
    users = {
        "sm": sum(len(c.sm_users) for c in enabled),
        "sharefile": sum(len(c.sharefile_employees) for c in enabled),
    }
    # Every child imports the same compiled modules, and none compiles one itself: an import that
    # compiled in one child of a pair and not in the other would count as customers' work.
    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)
    with simulator(scenario, latency_ms=0) as sim, tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "simulator.json"
        config_file.write_text(json.dumps({"env": sim.env(), "sm_token": sim.sm_token}))
        runs = [(stage, count) for stage in STAGES for count in (0, args.customers)]
        print(f"{len(runs)} runs under callgrind, two at a time ...", file=sys.stderr)
        with ThreadPoolExecutor(2) as pool:
            counts = dict(
                zip(runs, pool.map(lambda run: instructions(*run, config_file), runs), strict=True)
            )
    per_customer = {
        stage: (counts[stage, args.customers] - counts[stage, 0]) / args.customers
        for stage in STAGES
    }
    return {"customers": args.customers, "users": users, "per_customer": per_customer}


def print_table(result: dict[str, Any]) -> None:
    per_customer = result["per_customer"]
    floor = per_customer["floor"]
    users = result["users"]
    print(
        f"\nCPU work per customer, in instructions (callgrind), one thread, simulators at 0 ms: "
        f"the first {result['customers']} customers of the fleet "
        f"({users['sm']:,} Services Manager and {users['sharefile']:,} ShareFile users)"
    )
    print(f"{'stage':<10} {'instructions':>13} {'x floor':>8} {'added':>12}")
    previous = None
    for stage in STAGES:
        value = per_customer[stage]
        added = "" if previous is None else f"{value - previous:+,.0f}"
        print(f"{stage:<10} {value:>13,.0f} {value / floor:>7.2f}x {added:>12}")
        previous = value
    print("floor: fetch + json.loads; clients: + the product's clients; reconcile: + the plan;")
    print("handler: + requests, report, metrics, envelopes and message bodies")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200, help="customers per measured run")
    parser.add_argument("--fleet", type=int, default=2000, help="customers in the fleet")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--median-users", type=int, default=20)
    parser.add_argument("--large-share", type=float, default=0.002)
    parser.add_argument("--drift", type=float, default=0.03)
    parser.add_argument("--json", type=Path, help="write the results there")
    args = parser.parse_args()
    if args.customers < 1:
        parser.error("--customers must be at least 1")
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian: apt-get install valgrind)")
    result = measure(args)
    print_table(result)
    if args.json:
        write_results(args.json, "cpu_work", args, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
