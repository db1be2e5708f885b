"""Benchmark: one customer with N users on each side through the sync worker, against the I/O floor.

For each size in --users (default 10,000 / 100,000 / 1,000,000) it starts a simulator process
serving one generated customer of that size (2% drift, ShareFile feed paged at 500, Services
Manager cursor pages of the worker's page size, --latency-ms added to every call), then runs, each
in a fresh child process so that CPU time and peak RSS belong to it alone:
  * worker: the sync worker's handler on one sync.command, with the real HTTP clients: fetch the
    whole ShareFile feed, stream Services Manager's pages through reconcile, build the bulk
    provisioning requests and the report, and encode every output message as the broker would;
  * floor: a bare httpx loop that fetches the same pages in the same order (customer, token,
    every ShareFile page, every SM page, and every ShareFile page again where the worker reads
    the feed twice: it does before removing anyone as absent from a feed of several pages)
    and `json.loads` each one, keeping nothing.
The worker's plan is checked against the generator's expected end state (every provision and
deprovision, nothing more). The guard is lifted so that the plan holds every removal.
Prints wall time, CPU time and peak RSS of both, their ratio, and the cost per user; with --json
PATH it also writes the rows (docs/performance/users_scaling.json feeds the plot).
Usage: python bench/big_customer.py [--users 10000 100000 1000000] [--latency-ms 20]
       [--repeat 1] [--json docs/performance/users_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import peak_rss_mb, rereads_of

from adapters.sharefile import SELECTED_FIELDS

SIM_CREDENTIALS = {
    "client_id": "sfsync-sim",
    "client_secret": "sim-client-secret",
    "username": "api@sim.example",
    "password": "sim-password",
}


def serve(args: argparse.Namespace) -> None:
    """Child: serve one customer of --serve users until stdin closes; print where it listens."""
    from simulators import SHAREFILE_PAGE_SIZE, Faults, SimulatorServers, generate_fleet

    scenario = generate_fleet(
        1, big_customer_users=args.serve, drift=0.02, seed=args.seed, guard_safe=False
    )
    customer = scenario.customers[0]
    Path(args.expected_file).write_text(json.dumps(scenario.expected[customer.id]))
    faults = Faults(latency_ms=args.latency_ms)
    with SimulatorServers(
        scenario, sm_faults=faults, sharefile_faults=faults, sharefile_page_size=SHAREFILE_PAGE_SIZE
    ) as sims:
        where = {
            "customer_id": customer.id,
            "sm_url": sims.sm_url,
            "sm_token": sims.sm_token,
            "token_url": sims.sharefile_token_url_template,
            "api_url": sims.sharefile_api_url_template,
            # The worker reads the feed again before removing anyone as absent from it.
            "rereads": customer.id in rereads_of(scenario),
        }
        print(json.dumps(where), flush=True)
        sys.stdin.read()


def measured(run: Any) -> dict[str, Any]:
    """Run `run()`, adding its wall time, this process's CPU time and peak RSS to its result."""
    started, cpu = time.perf_counter(), time.process_time()
    result: dict[str, Any] = run()
    result["wall_s"] = time.perf_counter() - started
    result["cpu_s"] = time.process_time() - cpu
    result["rss_mb"] = peak_rss_mb()
    return result


def worker(where: dict[str, Any], users: int, credentials_file: str) -> dict[str, Any]:
    from consumers.sync_worker import SyncHandler
    from domain import Policy, SafetyGuard
    from domain.messages import ProvisioningRequested, SyncCommand
    from sfsync.bootstrap import build_clients, default_stamper
    from sfsync.settings import load_settings

    settings = load_settings(
        sm_url=where["sm_url"],
        sm_token=where["sm_token"],
        sharefile_token_url_template=where["token_url"],
        sharefile_api_url_template=where["api_url"],
        sharefile_credentials_file=credentials_file,
        log_level="WARNING",
    )
    clients = build_clients(settings, need_sharefile=True)
    assert clients.sharefile is not None
    stamp = default_stamper()
    handler = SyncHandler(
        sm=clients.sm,
        sharefile=clients.sharefile,
        policy=Policy(guard=SafetyGuard(max_deprovision=users, max_deprovision_ratio=1.0)),
        stamp=stamp,
    )
    command = stamp(
        SyncCommand(customer_id=where["customer_id"], run_id="bench"), correlation_id="bench"
    )

    def run() -> dict[str, Any]:
        outputs = handler.handle(command)
        published = sum(len(message.to_json()) for message in outputs)
        items = [
            [item.user_id, item.action]
            for message in outputs
            if isinstance(message.payload, ProvisioningRequested)
            for item in message.payload.items
        ]
        return {"items": items, "published_bytes": published}

    try:
        return measured(run)
    finally:
        clients.close()


def floor(where: dict[str, Any], sm_page_size: int) -> dict[str, Any]:
    """The same calls in the same order as the worker, each page parsed and dropped."""
    customer = where["customer_id"]
    sm_auth = {"Authorization": f"Bearer {where['sm_token']}"}

    def run() -> dict[str, Any]:
        pages = 0
        subdomain = json.loads(
            http.get(f"{where['sm_url']}/customers/{customer}", headers=sm_auth).content
        )["sharefile"]["subdomain"]
        token = json.loads(
            http.post(
                where["token_url"].format(subdomain=subdomain),
                data={"grant_type": "password", **SIM_CREDENTIALS},
            ).content
        )["access_token"]
        # The worker's $select: the same fields, so pages of the same size.
        employees = (
            where["api_url"].format(subdomain=subdomain)
            + f"Accounts/Employees?$select={SELECTED_FIELDS}"
        )
        sharefile_auth = {"Authorization": f"Bearer {token}"}

        def read_feed() -> int:
            read = 0
            url: str | None = employees
            while url:
                url = json.loads(http.get(url, headers=sharefile_auth).content).get(
                    "odata.nextLink"
                )
                read += 1
            return read

        pages += read_feed()
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": sm_page_size}
            if cursor:
                params["cursor"] = cursor
            page = json.loads(
                http.get(
                    f"{where['sm_url']}/customers/{customer}/users", params=params, headers=sm_auth
                ).content
            )
            pages += 1
            cursor = page.get("next_cursor")
            if not cursor:
                break
        if where["rereads"]:
            pages += read_feed()
        return {"pages": pages}

    with httpx.Client(timeout=60) as http:
        return measured(run)


def child(args: argparse.Namespace) -> None:
    where = json.loads(args.where)
    if args.child == "worker":
        result = worker(where, args.users[0], args.credentials_file)
    else:
        result = floor(where, args.sm_page_size)
    print(json.dumps(result))


class Simulator:
    """The simulator child process of one fleet size, and what it told us."""

    def __init__(self, users: int, args: argparse.Namespace, tmp: Path) -> None:
        self.expected_file = tmp / f"expected-{users}.json"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(users),
                "--expected-file",
                str(self.expected_file),
                "--latency-ms",
                str(args.latency_ms),
                "--seed",
                str(args.seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the simulator for {users:,} users did not start")
        self.where: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)

    def oracle(self) -> set[tuple[str, str]]:
        """Every (user, action) the plan must hold: the generator's expected end state."""
        initial = httpx.get(self.where["sm_url"].split("/api/")[0] + "/_sim/state", timeout=120)
        before = initial.json()[self.where["customer_id"]]
        expected = json.loads(self.expected_file.read_text())
        wanted = set()
        for user, state in expected.items():
            if state == "provisioned" and before[user] != "provisioned":
                wanted.add((user, "provision"))
            elif state == "not_provisioned" and before[user] == "provisioned":
                wanted.add((user, "deprovision"))
        return wanted


def run_child(kind: str, where: dict[str, Any], users: int, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--where",
        json.dumps(where),
        "--users",
        str(users),
        "--credentials-file",
        args.credentials_file,
        "--sm-page-size",
        str(args.sm_page_size),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {kind} child failed:\n{done.stderr}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_size(users: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print(f"{users:,} users per side: starting the simulator ...", file=sys.stderr)
    sim = Simulator(users, args, tmp)
    try:
        wanted = sim.oracle()
        floors, workers = [], []
        for attempt in range(args.repeat):
            print(f"  run {attempt + 1}/{args.repeat}: floor, then worker", file=sys.stderr)
            floors.append(run_child("floor", sim.where, users, args))
            workers.append(run_child("worker", sim.where, users, args))
            planned = {(user, action) for user, action in workers[-1].pop("items")}
            if planned != wanted:
                raise SystemExit(
                    f"{users:,} users: the plan differs from the expected state: "
                    f"{len(planned - wanted)} unexpected, {len(wanted - planned)} missing"
                )
    finally:
        sim.close()

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    return {
        "users": users,
        "worker_s": median(workers, "wall_s"),
        "cpu_s": median(workers, "cpu_s"),
        "rss_mb": median(workers, "rss_mb"),
        "floor_s": median(floors, "wall_s"),
        "floor_cpu_s": median(floors, "cpu_s"),
        "floor_rss_mb": median(floors, "rss_mb"),
        "pages": floors[0]["pages"],
        "actions": len(wanted),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sm-page-size", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expected-file", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["worker", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--where", help=argparse.SUPPRESS)
    parser.add_argument("--credentials-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return 0
    if args.child:
        child(args)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        credentials = Path(tmp) / "credentials.json"
        credentials.write_text(json.dumps({"*": SIM_CREDENTIALS}))
        args.credentials_file = str(credentials)
        for users in args.users:
            rows.append(measure_size(users, args, Path(tmp)))

    print(
        f"\none customer through the sync worker, {args.latency_ms:g} ms per call, "
        f"ShareFile pages of 500, SM pages of {args.sm_page_size}, median of {args.repeat}"
    )
    header = (
        f"{'users/side':>11} {'pages':>6} {'actions':>8} {'worker s':>9} {'cpu s':>7} "
        f"{'RSS MB':>7} {'floor s':>8} {'floor cpu':>9} {'floor MB':>8} {'ratio':>6} "
        f"{'us/user':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['users']:>11,} {row['pages']:>6,} {row['actions']:>8,} "
            f"{row['worker_s']:>9.2f} {row['cpu_s']:>7.2f} {row['rss_mb']:>7.0f} "
            f"{row['floor_s']:>8.2f} {row['floor_cpu_s']:>9.2f} {row['floor_rss_mb']:>8.0f} "
            f"{row['worker_s'] / row['floor_s']:>5.2f}x "
            f"{row['worker_s'] / row['users'] * 1e6:>8.1f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"latency_ms": args.latency_ms, "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
