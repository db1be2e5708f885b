"""Benchmark: the CPU work of one customer's sync, against the bare fetch of the same pages.

The fleet benchmark's goal "a cycle within 1.5x the I/O floor" compares wall times on a shared
machine whose speed changes by more than the differences at stake (docs/performance.md). This
script measures what the product itself adds to the floor's work, one thread, no broker, in one
of two units:

  instructions  (the default) executed in user space, counted by valgrind's callgrind: the same
                count for the same code whatever the machine is doing, but blind to the kernel
                and to how fast each instruction runs
  cpu           CPU time (user + system) of the process: what the machine really spends, but
                only comparable within one run; stages alternate, --rounds times, medians

It generates the fleet of `bench/fleet_cycle.py` (same seed and shape), starts the simulators
(a forked process, no added latency, not under valgrind), and runs each stage below in a child
process, one thread, over the first N enabled customers of the fleet. In instructions each runs
under callgrind, and again over none: the difference over N is the instructions per customer
(imports and set-up cancel out). In CPU time the child first runs the stage over the next N
customers (a warm-up: imports, pydantic's first validations, the connections), then times the N
(each customer's ShareFile token is fetched, as in a cycle). Stages, each doing more of what a
worker does for a customer:

  floor      the I/O floor's loop: every page a worker fetches, with the same httpx client and
             transport, each answer JSON-decoded (`fleet_cycle.PageFetcher`, which reads a feed
             twice where the worker does)
  clients    the product's API clients fetching the same pages: the customer, the ShareFile
             employee feed (token, pages, users validated) and the Services Manager users, and
             the feed's second read where the handler makes one
  reconcile  the same, with the users reconciled into a plan (`domain.reconcile`)
  handler    the sync worker's handler (`SyncHandler.handle`: the above plus the provisioning
             requests, the report, metrics and the envelopes), and each output's message body
             as the runner publishes it

Valgrind runs Python 30-80 times slower: the default (200 customers, 8 runs, two at a time)
takes a few minutes. Counts vary by up to about 0.5 % between runs of the same code (random
ids, clock reads, garbage collections). In CPU time, 5 rounds of 600 customers take about a
minute.
Usage: python bench/cpu_work.py [--unit instructions|cpu] [--customers 200] [--rounds 5]
       [--fleet 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import rereads_of, write_results
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


def stage_runner(
    stage: str, config: dict[str, Any]
) -> tuple[list[Any], Callable[[Sequence[Any]], None]]:
    """The enabled customers, in listing order, and a function doing `stage` for some of them.

    Each customer's ShareFile token is fetched the first time it is synchronised, as in a
    cycle: a process that synchronised a customer before would have it cached.
    """
    env = config["env"]
    rereads = frozenset(config["rereads"])
    if stage == "floor":
        http = new_http_client(timeout_s=60)
        fetcher = PageFetcher(http, env, config["sm_token"], rereads)

        def fetch(customers: Sequence[Any]) -> None:
            for customer in customers:
                fetcher.fetch(customer)

        return fetcher.enabled_customers(), fetch

    settings = settings_of(env)
    clients = build_clients(settings, need_sharefile=True)
    assert clients.sharefile is not None
    sharefile = clients.sharefile
    policy = settings.policy()
    stamp = default_stamper()
    handler = SyncHandler(sm=clients.sm, sharefile=sharefile, policy=policy, stamp=stamp)

    def sync(customers: Sequence[Any]) -> None:
        for listed in customers:
            if stage == "handler":
                command = stamp(
                    SyncCommand(customer_id=listed.id, run_id="cpu"), correlation_id="cpu"
                )
                for output in handler.handle(command):
                    Outgoing.of(output)
                continue
            customer = clients.sm.get_customer(listed.id)
            feed = sharefile.employees(customer)
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
            if listed.id in rereads:  # the handler's second read, as the floor's
                known = {user.id for user in sharefile_users}
                for _ in sharefile.employees(customer, known=known):
                    pass

    return [c for c in clients.sm.list_customers() if c.sharefile_enabled], sync


def child(stage: str, count: int, config_file: Path, unit: str) -> None:
    """One stage over the first `count` enabled customers (run by the parent; under callgrind
    for instructions). For CPU time, print the seconds the `count` customers took."""
    config = json.loads(config_file.read_text())
    customers, run = stage_runner(stage, config)
    if unit == "instructions":
        run(customers[:count])
        return
    run(customers[count : 2 * count])  # the warm-up, on other customers
    started = time.process_time()
    run(customers[:count])
    print(time.process_time() - started)


def _child_command(stage: str, count: int, config_file: Path, unit: str) -> list[str]:
    return [sys.executable, __file__, "--child", stage, str(count), str(config_file), unit]


def _child_env() -> dict[str, str]:
    bench = str(Path(__file__).resolve().parent)
    return {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (bench, os.environ.get("PYTHONPATH")) if p),
    }


def instructions(stage: str, count: int, config_file: Path) -> int:
    """Instructions callgrind counted for a child process running `stage` over `count`."""
    command = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *_child_command(stage, count, config_file, "instructions"),
    ]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, check=False)
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{stage} x {count} failed (exit {done.returncode}):\n{done.stderr}")
    return int(found.group(1).replace(",", ""))


def cpu_seconds(stage: str, count: int, config_file: Path) -> float:
    """CPU seconds a child process spent on `stage` over `count` customers, after a warm-up."""
    command = _child_command(stage, count, config_file, "cpu")
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} x {count} failed (exit {done.returncode}):\n{done.stderr}")
    return float(done.stdout.split()[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    print(f"generating {args.fleet:,} customers ...", file=sys.stderr)
    scenario = generate_fleet(
        args.fleet,
        seed=args.seed,
        median_users=args.median_users,
        drift=args.drift,
        large_share=args.large_share,
    )
    enabled = [c for c in scenario.customers if c.sharefile_enabled]
    if args.unit == "cpu" and len(enabled) < 2 * args.customers:
        raise SystemExit(
            f"--customers {args.customers} needs a fleet of {2 * args.customers:,} enabled "
            f"customers (the warm-up takes the next ones); this one has {len(enabled):,}"
        )
    measured = enabled[: args.customers]
    users = {
        "sm": sum(len(c.sm_users) for c in measured),
        "sharefile": sum(len(c.sharefile_employees) for c in measured),
    }
    # Every child imports the same compiled modules, and none compiles one itself: an import that
    # compiled in one child of a pair and not in the other would count as customers' work.
    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)
    with simulator(scenario, latency_ms=0) as sim, tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "simulator.json"
        config = {
            "env": sim.env(),
            "sm_token": sim.sm_token,
            "rereads": sorted(rereads_of(scenario)),
        }
        config_file.write_text(json.dumps(config))
        if args.unit == "instructions":
            per_customer, spread = _instructions_per_customer(args.customers, config_file), None
        else:
            per_customer, spread = _cpu_per_customer(args.customers, args.rounds, config_file)
    return {
        "unit": args.unit,
        "customers": args.customers,
        "users": users,
        "per_customer": per_customer,
        **({"rounds": spread} if spread is not None else {}),
    }


def _instructions_per_customer(count: int, config_file: Path) -> dict[str, float]:
    runs = [(stage, n) for stage in STAGES for n in (0, count)]
    print(f"{len(runs)} runs under callgrind, two at a time ...", file=sys.stderr)
    with ThreadPoolExecutor(2) as pool:
        found = pool.map(lambda run: instructions(run[0], run[1], config_file), runs)
        counts = dict(zip(runs, found, strict=True))
    return {stage: (counts[stage, count] - counts[stage, 0]) / count for stage in STAGES}


def _cpu_per_customer(
    count: int, rounds: int, config_file: Path
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median CPU microseconds per customer of each stage; the stages alternate, one child at a
    time, so that a machine slowing down for a while slows every stage of a round."""
    measured: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for number in range(1, rounds + 1):
        print(f"round {number}/{rounds} ...", file=sys.stderr)
        for stage in STAGES:
            measured[stage].append(cpu_seconds(stage, count, config_file) / count * 1e6)
    return {stage: statistics.median(values) for stage, values in measured.items()}, measured


def print_table(result: dict[str, Any]) -> None:
    per_customer = result["per_customer"]
    floor = per_customer["floor"]
    users = result["users"]
    in_cpu = result["unit"] == "cpu"
    unit = (
        "CPU time (user + system), median of the rounds" if in_cpu else "instructions (callgrind)"
    )
    print(
        f"\nCPU work per customer, in {unit}, one thread, simulators at 0 ms: the first "
        f"{result['customers']} customers of the fleet ({users['sm']:,} Services Manager and "
        f"{users['sharefile']:,} ShareFile users)"
    )
    heading = "us" if in_cpu else "instructions"
    print(
        f"{'stage':<10} {heading:>13} {'x floor':>8} {'added':>12}" + ("  rounds" if in_cpu else "")
    )
    previous = None
    for stage in STAGES:
        value = per_customer[stage]
        added = "" if previous is None else f"{value - previous:+,.0f}"
        rounds = "  " + " ".join(f"{v:,.0f}" for v in result["rounds"][stage]) if in_cpu else ""
        print(f"{stage:<10} {value:>13,.0f} {value / floor:>7.2f}x {added:>12}{rounds}")
        previous = value
    print("floor: fetch + json.loads; clients: + the product's clients; reconcile: + the plan;")
    print("handler: + requests, report, metrics, envelopes and message bodies")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", choices=["instructions", "cpu"], default="instructions")
    parser.add_argument(
        "--customers",
        type=int,
        help="customers per measured run (default: 200 in instructions, 600 in CPU time)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="CPU time: alternating rounds")
    parser.add_argument("--fleet", type=int, default=2000, help="customers in the fleet")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--median-users", type=int, default=20)
    parser.add_argument("--large-share", type=float, default=0.002)
    parser.add_argument("--drift", type=float, default=0.03)
    parser.add_argument("--json", type=Path, help="write the results there")
    args = parser.parse_args()
    if args.customers is None:
        args.customers = 600 if args.unit == "cpu" else 200
    if args.customers < 1:
        parser.error("--customers must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.unit == "instructions" and shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian: apt-get install valgrind), or --unit cpu")
    result = measure(args)
    print_table(result)
    if args.json:
        write_results(args.json, "cpu_work", args, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
