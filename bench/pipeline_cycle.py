"""Benchmark: a sync cycle of a generated fleet through RabbitMQ, and the scheduler's publish rate.

For each worker count (default 1 and 2) it starts a fresh simulator process (`sfsync simulate
--fleet N --latency-ms 20`), worker and submitter processes on a fresh topology prefix, schedules
one run from this process and times it from the first published command to the last report and
answer; then it checks the simulator's end state against the fleet's expected state.
Baselines measured in the same run:
  * sequential: the original utility's model, one customer after another in one process, with
    the same HTTP clients and handlers, no broker (on a sample of --sequential-sample customers,
    reported per customer and extrapolated to the fleet);
  * I/O floor: a bare httpx loop that only fetches the same pages (customer, users, token,
    employees) for every customer, with the same total concurrency as the largest worker count;
  * publish limit: pika publishing the same command bodies without confirms.
Usage: python bench/pipeline_cycle.py [--customers 1000] [--workers 1 2] [--concurrency 16]
       [--latency-ms 20] [--commands 10000] [--amqp-url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pika

from adapters.amqp import AmqpBroker
from adapters.topology import Topology
from consumers.submitter import SubmitHandler
from consumers.sync_worker import SyncHandler
from domain.messages import SyncCommand
from producers.scheduler import Scheduler
from sfsync.bootstrap import build_clients, default_stamper
from sfsync.oneshot import sync_once
from sfsync.settings import load_settings
from simulators import generate_fleet

SFSYNC = [sys.executable, "-m", "sfsync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def simulator(customers: int, seed: int, latency_ms: float) -> Iterator[dict[str, str]]:
    sm_port, sf_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *SFSYNC,
            "simulate",
            "--fleet",
            str(customers),
            "--seed",
            str(seed),
            "--latency-ms",
            str(latency_ms),
            "--sm-port",
            str(sm_port),
            "--sharefile-port",
            str(sf_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{sm_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{root}/_sim/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("simulator did not start") from None
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            credentials = Path(tmp) / "credentials.json"
            credentials.write_text(
                json.dumps(
                    {
                        "*": {
                            "client_id": "sfsync-sim",
                            "client_secret": "sim-client-secret",
                            "username": "api@sim.example",
                            "password": "sim-password",
                        }
                    }
                )
            )
            yield {
                "SFSYNC_SM_URL": f"{root}/api/v1",
                "SFSYNC_SM_TOKEN": "sim-sm-token",
                "SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE": f"http://127.0.0.1:{sf_port}/{{subdomain}}/oauth/token",
                "SFSYNC_SHAREFILE_API_URL_TEMPLATE": f"http://127.0.0.1:{sf_port}/{{subdomain}}/sf/v3/",
                "SFSYNC_SHAREFILE_CREDENTIALS_FILE": str(credentials),
                "_SIM_ROOT": root,
            }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings_of(env: dict[str, str], **extra: str):  # type: ignore[no-untyped-def]
    values = {
        k.removeprefix("SFSYNC_").lower(): v
        for k, v in {**env, **extra}.items()
        if k.startswith("SFSYNC_")
    }
    return load_settings(**values)


def delete_prefix(amqp_url: str, topology: Topology) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for spec in topology.queues():
            connection.channel().queue_delete(spec.name)
        connection.channel().exchange_delete(topology.exchange)
    finally:
        connection.close()


def wait_consumers(amqp_url: str, queue: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            if (
                connection.channel().queue_declare(queue, passive=True).method.consumer_count
                >= count
            ):
                return
        except pika.exceptions.ChannelClosedByBroker:
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    raise RuntimeError(f"{queue}: fewer than {count} consumers after 60 s")


def pipeline_cycle(args: argparse.Namespace, workers: int, expected: dict) -> tuple[float, bool]:  # type: ignore[type-arg]
    with simulator(args.customers, args.seed, args.latency_ms) as env:
        prefix = f"sfsync-bench-{uuid.uuid4().hex[:6]}"
        env = {
            **env,
            "SFSYNC_BROKER_URL": args.amqp_url,
            "SFSYNC_PREFIX": prefix,
            "SFSYNC_LOG_LEVEL": "WARNING",
        }
        topology = Topology(prefix=prefix)
        child_env = {**os.environ, **env}
        procs = [
            subprocess.Popen(
                [*SFSYNC, "worker", "--concurrency", str(args.concurrency)], env=child_env
            )
            for _ in range(workers)
        ]
        procs.append(
            subprocess.Popen(
                [*SFSYNC, "submitter", "--concurrency", str(args.concurrency)], env=child_env
            )
        )
        try:
            wait_consumers(args.amqp_url, f"{prefix}.sync", workers)
            wait_consumers(args.amqp_url, f"{prefix}.provisioning", 1)
            started = time.perf_counter()
            result = sync_once(settings_of(env), local_workers=False, timeout_s=3600)
            seconds = time.perf_counter() - started
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            delete_prefix(args.amqp_url, topology)
        state = httpx.get(f"{env['_SIM_ROOT']}/_sim/state", timeout=30).json()
        exact = state == expected and not result.failed
        return seconds, exact


def sequential_baseline(args: argparse.Namespace) -> float:
    """One customer after another, same clients and handlers, no broker: seconds per customer."""
    with simulator(args.customers, args.seed, args.latency_ms) as env:
        settings = settings_of(env)
        clients = build_clients(settings, need_sharefile=True)
        stamp = default_stamper()
        assert clients.sharefile is not None
        sync = SyncHandler(
            sm=clients.sm, sharefile=clients.sharefile, policy=settings.policy(), stamp=stamp
        )
        submit = SubmitHandler(sm=clients.sm, stamp=stamp)
        customers = [c.id for c in clients.sm.list_customers()][: args.sequential_sample]
        started = time.perf_counter()
        for customer_id in customers:
            command = stamp(
                SyncCommand(customer_id=customer_id, run_id="sequential"),
                correlation_id="sequential",
            )
            for output in sync.handle(command):
                if output.type == "provisioning.requested":
                    submit.handle(output)
        seconds = time.perf_counter() - started
        clients.close()
        return seconds / len(customers)


def io_floor(args: argparse.Namespace, threads: int) -> float:
    """Seconds to fetch every page the workers fetch, with plain httpx and `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    with simulator(args.customers, args.seed, args.latency_ms) as env:
        sm_url, sm_auth = (
            env["SFSYNC_SM_URL"],
            {"Authorization": f"Bearer {env['SFSYNC_SM_TOKEN']}"},
        )
        token_url = env["SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE"]
        api_url = env["SFSYNC_SHAREFILE_API_URL_TEMPLATE"]
        credentials = json.loads(Path(env["SFSYNC_SHAREFILE_CREDENTIALS_FILE"]).read_text())["*"]
        limits = httpx.Limits(max_connections=threads * 2, max_keepalive_connections=threads * 2)
        with httpx.Client(limits=limits, timeout=60) as http:
            customers = http.get(f"{sm_url}/customers", headers=sm_auth).json()["items"]

            def fetch(customer: dict) -> None:  # type: ignore[type-arg]
                sub = customer["sharefile"]["subdomain"]
                http.get(f"{sm_url}/customers/{customer['id']}", headers=sm_auth)
                cursor = None
                while True:
                    params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                    page = http.get(
                        f"{sm_url}/customers/{customer['id']}/users", params=params, headers=sm_auth
                    ).json()
                    cursor = page.get("next_cursor")
                    if not cursor:
                        break
                token = http.post(
                    token_url.format(subdomain=sub), data={"grant_type": "password", **credentials}
                ).json()
                auth = {"Authorization": f"Bearer {token['access_token']}"}
                url: str | None = api_url.format(subdomain=sub) + "Accounts/Employees"
                while url:
                    url = http.get(url, headers=auth).json().get("odata.nextLink")

            enabled = [c for c in customers if c["sharefile"]["enabled"]]
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fetch, enabled))
            return time.perf_counter() - started


class ListedCustomers:
    def __init__(self, n: int) -> None:
        self.ids = [f"cust-{i:06d}" for i in range(n)]

    def list_customers(self):  # type: ignore[no-untyped-def]
        from domain.records import Customer

        return (Customer(id=i, sharefile_enabled=True, subdomain=i) for i in self.ids)


def publish_rates(args: argparse.Namespace) -> tuple[float, float]:
    prefix = f"sfsync-bench-{uuid.uuid4().hex[:6]}"
    topology = Topology(prefix=prefix)
    broker = AmqpBroker([args.amqp_url], topology, name="bench-scheduler")
    broker.start()
    try:
        scheduler = Scheduler(
            sm=ListedCustomers(args.commands),
            broker=broker,
            stamp=default_stamper(),  # type: ignore[arg-type]
            new_run_id=lambda: "bench",
        )
        started = time.perf_counter()
        scheduler.run_once()
        confirmed = args.commands / (time.perf_counter() - started)
    finally:
        broker.close()
    stamp = default_stamper()
    bodies = [
        stamp(SyncCommand(customer_id=i, run_id="bench"), correlation_id="bench").to_json()
        for i in ListedCustomers(args.commands).ids
    ]
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    try:
        channel = connection.channel()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        started = time.perf_counter()
        for body in bodies:
            channel.basic_publish(topology.exchange, "sync.command", body, properties)
        connection.process_data_events(0)
        unconfirmed = args.commands / (time.perf_counter() - started)
    finally:
        connection.close()
    delete_prefix(args.amqp_url, topology)
    return confirmed, unconfirmed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sequential-sample", type=int, default=100)
    parser.add_argument("--commands", type=int, default=10_000)
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    args = parser.parse_args()

    expected = generate_fleet(args.customers, seed=args.seed).expected
    rows: list[tuple[str, str]] = []
    print(f"publish rate, {args.commands:,} commands ...", file=sys.stderr)
    confirmed, unconfirmed = publish_rates(args)
    rows.append(
        (f"scheduler publish, confirmed ({args.commands:,} commands)", f"{confirmed:,.0f} msg/s")
    )
    rows.append(("baseline: pika publish without confirms", f"{unconfirmed:,.0f} msg/s"))
    rows.append(("scheduler / baseline", f"{confirmed / unconfirmed:.0%}"))
    print(f"sequential baseline on {args.sequential_sample} customers ...", file=sys.stderr)
    per_customer = sequential_baseline(args)
    rows.append(
        (
            f"baseline: sequential, per customer (sample {args.sequential_sample})",
            f"{per_customer * 1000:.0f} ms",
        )
    )
    rows.append(
        (
            f"baseline: sequential, {args.customers:,} customers (extrapolated)",
            f"{per_customer * args.customers:.1f} s",
        )
    )
    threads = max(args.workers) * args.concurrency
    print(f"I/O floor with {threads} threads ...", file=sys.stderr)
    floor = io_floor(args, threads)
    rows.append((f"baseline: I/O floor, bare httpx, {threads} threads", f"{floor:.1f} s"))
    for workers in args.workers:
        print(f"cycle with {workers} worker process(es) ...", file=sys.stderr)
        seconds, exact = pipeline_cycle(args, workers, expected)
        rows.append(
            (
                f"cycle, {workers} worker process(es) x {args.concurrency} threads",
                f"{seconds:.1f} s ({'exact' if exact else 'MISMATCH'})",
            )
        )
        rows.append(
            ("  speed-up over sequential", f"{per_customer * args.customers / seconds:.1f}x")
        )
        rows.append(("  / I/O floor", f"{seconds / floor:.2f}x"))

    print(
        f"\nsync cycle of {args.customers:,} customers through RabbitMQ, "
        f"simulators at {args.latency_ms:g} ms latency"
    )
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'measure':<{width}}value")
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
