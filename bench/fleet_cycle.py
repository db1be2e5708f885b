"""Benchmark: sync cycles of generated fleets through RabbitMQ, against their baselines.

For each fleet size (default 2,000 and 10,000 customers: users per customer lognormal around a
median of 20, plus a share of 0.2% "large" customers of 5,000 to 15,000 users, 3% drift) it
generates the fleet once, then for each measurement starts a fresh simulator process (a fork of
this one serving that fleet, both APIs at --latency-ms added latency per call), so that every
measurement starts from the same state:

  * cycle, for each worker count (default 1, 2, 4): worker processes (`sfsync worker
    --concurrency C`) and one submitter process (`sfsync submitter --concurrency C`) on a fresh
    topology prefix; this process runs the scheduler and follows the run (`sync_once`, as
    `sfsync sync --no-local-workers` does). Timed from the scheduler's start (listing the
    customers) to the last report *and* the last provisioning answer. Then the simulator's end
    state is compared with the fleet's `expected` oracle: "exact" or "MISMATCH".
  * baseline (a) sequential: the original utility's model, one process, one customer after the
    other, with the same HTTP clients (`build_clients`) and the same handlers (SyncHandler,
    SubmitHandler), no broker. Measured in full for fleets up to --sequential-full-max
    customers; above that on a random sample of --sequential-sample customers (seeded),
    reported per customer and extrapolated to the fleet (labelled "sample" in the table).
  * baseline (b) I/O floor, for each worker count: a bare httpx loop (the same httpx client and
    transport as the product, `new_http_client`) that only fetches the pages the workers fetch
    (the customer list, then per enabled customer: customer, user pages, token, employee pages
    with the same $select), with the same total concurrency (workers x C threads). It does not
    parse users, reconcile, publish, or post provisioning requests. With --repeat N, floor and
    cycle alternate (N pairs); "/floor" is the median of the N pairs' ratios, each cycle over
    the floor measured just before it.

Each process's CPU time during every cycle is recorded (workers, submitter, this process, the
simulator, RabbitMQ) to show what bounds it; during every floor, its loop's process and the
simulator (a loop near 100 % of one core is bound by its HTTP client's CPU, not by the I/O).
The machine's speed is measured at the start and at the end of each fleet (a Python loop's CPU,
and the client CPU of one loopback request): on this shared machine it changes from day to day and
within the hour, and the goals with it. The table also gives each floor's own speed-up over the
sequential baseline: what a cycle exactly as fast as its floor would reach.
With --profile DIR, py-spy records every process of each cycle into DIR (collapsed stacks;
slows the cycle: do not quote those timings).
Usage: python bench/fleet_cycle.py [--customers 2000 10000] [--workers 1 2 4] [--concurrency 32]
       [--latency-ms 20] [--repeat 1] [--json PATH] [--profile DIR] [--amqp-url URL]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import pika
import psutil  # type: ignore[import-untyped]
from common import delete_topology, rereads_of, write_results
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

import sfsync.audit  # noqa: F401 - imported here, not inside the first timed sync_once
from adapters.http import new_http_client
from adapters.sharefile import SELECTED_FIELDS
from adapters.topology import Topology
from consumers.submitter import SubmitHandler
from consumers.sync_worker import SyncHandler
from domain.messages import SyncCommand
from sfsync.bootstrap import build_clients, default_stamper
from sfsync.oneshot import sync_once
from sfsync.settings import Settings, load_settings
from simulators import SHAREFILE_PAGE_SIZE, Faults, Scenario, SimulatorServers, generate_fleet

SFSYNC = [sys.executable, "-m", "sfsync"]
CREDENTIALS = {
    "client_id": "sfsync-sim",
    "client_secret": "sim-client-secret",
    "username": "api@sim.example",
    "password": "sim-password",
}


# -- the simulator: a forked process serving the fleet generated here -------------------------


def _serve(scenario: Scenario, latency_ms: float, ports: Any, stop: Any) -> None:
    faults = Faults(latency_ms=latency_ms)
    with SimulatorServers(
        scenario,
        sm_faults=faults,
        sharefile_faults=faults,
        sharefile_page_size=SHAREFILE_PAGE_SIZE,
    ) as sims:
        ports.put((sims.sm_root_url, sims.sharefile_root_url, sims.sm_token))
        stop.wait()


@dataclass
class Simulator:
    sm_root: str
    sharefile_root: str
    sm_token: str
    pid: int
    credentials_file: str

    def env(self) -> dict[str, str]:
        account = f"{self.sharefile_root}/{{subdomain}}"
        return {
            "SFSYNC_SM_URL": f"{self.sm_root}/api/v1",
            "SFSYNC_SM_TOKEN": self.sm_token,
            "SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE": f"{account}/oauth/token",
            "SFSYNC_SHAREFILE_API_URL_TEMPLATE": f"{account}/sf/v3/",
            "SFSYNC_SHAREFILE_CREDENTIALS_FILE": self.credentials_file,
        }

    def state(self) -> Any:
        return httpx.get(f"{self.sm_root}/_sim/state", timeout=120).json()


@contextmanager
def simulator(scenario: Scenario, latency_ms: float) -> Iterator[Simulator]:
    """A fresh simulator process over `scenario` (forked: the fleet is not generated again)."""
    context = multiprocessing.get_context("fork")
    ports, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(scenario, latency_ms, ports, stop))
    process.start()
    try:
        sm_root, sharefile_root, token = ports.get(timeout=120)
        with tempfile.TemporaryDirectory() as tmp:
            credentials = Path(tmp) / "credentials.json"
            credentials.write_text(json.dumps({"*": CREDENTIALS}))
            assert process.pid is not None
            yield Simulator(sm_root, sharefile_root, token, process.pid, str(credentials))
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def settings_of(env: dict[str, str]) -> Settings:
    values = {
        k.removeprefix("SFSYNC_").lower(): v for k, v in env.items() if k.startswith("SFSYNC_")
    }
    return load_settings(**values)


# -- CPU accounting and profiles ---------------------------------------------------------------


def rabbit_process() -> psutil.Process | None:
    """The RabbitMQ node listening on 5672 (the broker the benchmark uses), if visible."""
    try:
        lines = subprocess.check_output(["ss", "-ltnp"], text=True).splitlines()  # noqa: S607
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in lines:
        if re.search(r":5672\s", line) and (found := re.search(r"pid=(\d+)", line)):
            return psutil.Process(int(found.group(1)))
    return None


class CpuMeter:
    """CPU seconds (user + system) each named process spends between start() and stop()."""

    def __init__(self, processes: dict[str, psutil.Process | None]) -> None:
        self.processes = {name: p for name, p in processes.items() if p is not None}
        self._before: dict[str, float] = {}

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        self._before = {name: self._cpu(p) for name, p in self.processes.items()}

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, process in self.processes.items():
            kind = name.rstrip("0123456789")
            used[kind] = used.get(kind, 0.0) + self._cpu(process) - self._before[name]
        return {name: round(seconds, 2) for name, seconds in used.items()}


@contextmanager
def profiled(directory: Path | None, label: str, pids: dict[str, int]) -> Iterator[None]:
    """py-spy record of each process while the block runs (collapsed stacks, 100 Hz)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [
        subprocess.Popen(
            [
                *(py_spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "--threads"),
                *("--gil", "-o", str(directory / f"{label}-{name}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # let py-spy attach
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)


# -- the measurements --------------------------------------------------------------------------


def wait_consumers(amqp_url: str, queue: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            declared = connection.channel().queue_declare(queue, passive=True)
            if declared.method.consumer_count >= count:
                return
        except pika.exceptions.ChannelClosedByBroker:
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    raise RuntimeError(f"{queue}: fewer than {count} consumers after 60 s")


@dataclass
class Cycle:
    workers: int
    threads: int
    seconds: float
    exact: bool
    cpu_s: dict[str, float] = field(default_factory=dict)


def cycle(
    args: argparse.Namespace, scenario: Scenario, workers: int, profile: Path | None
) -> Cycle:
    with simulator(scenario, args.latency_ms) as sim:
        prefix = f"sfsync-bench-{uuid.uuid4().hex[:6]}"
        env = {
            **sim.env(),
            "SFSYNC_BROKER_URL": args.amqp_url,
            "SFSYNC_PREFIX": prefix,
            "SFSYNC_LOG_LEVEL": "WARNING",
        }
        child_env = {**os.environ, **env}
        concurrency = str(args.concurrency)
        procs = [
            subprocess.Popen(
                [*SFSYNC, "worker", "--concurrency", concurrency],
                env=child_env,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        procs.append(
            subprocess.Popen(
                [*SFSYNC, "submitter", "--concurrency", concurrency],
                env=child_env,
                stderr=subprocess.DEVNULL,
            )
        )
        try:
            wait_consumers(args.amqp_url, f"{prefix}.sync", workers)
            wait_consumers(args.amqp_url, f"{prefix}.provisioning", 1)
            pids = {f"worker{i}": p.pid for i, p in enumerate(procs[:-1])}
            pids.update(submitter=procs[-1].pid, scheduler_tracker=os.getpid(), simulator=sim.pid)
            meter = CpuMeter(
                {name: psutil.Process(pid) for name, pid in pids.items()}
                | {"rabbitmq": rabbit_process()}
            )
            label = f"{len(scenario.customers)}c-{workers}w"
            with profiled(profile, label, pids):
                meter.start()
                started = time.perf_counter()
                result = sync_once(settings_of(env), local_workers=False, timeout_s=3600)
                seconds = time.perf_counter() - started
                cpu = meter.stop()
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            delete_topology(args.amqp_url, Topology(prefix=prefix))
        exact = (
            sim.state() == scenario.expected and not result.failed and not result.failed_requests
        )
        return Cycle(workers, workers * args.concurrency, seconds, exact, cpu)


@dataclass
class Sequential:
    mode: str  # "full" or "sample"
    customers: int  # how many were synchronised
    users: int  # SM users of those customers
    per_customer_s: float
    fleet_s: float  # measured (full) or extrapolated (sample)


def sequential(args: argparse.Namespace, scenario: Scenario) -> Sequential:
    """One customer after another with the product's clients and handlers, no broker."""
    enabled = [c for c in scenario.customers if c.sharefile_enabled]
    if len(scenario.customers) <= args.sequential_full_max:
        mode, chosen = "full", enabled
    else:
        mode = "sample"
        chosen = random.Random(args.seed).sample(enabled, min(args.sequential_sample, len(enabled)))
    with simulator(scenario, args.latency_ms) as sim:
        settings = settings_of(sim.env())
        clients = build_clients(settings, need_sharefile=True)
        assert clients.sharefile is not None
        stamp = default_stamper()
        sync = SyncHandler(
            sm=clients.sm, sharefile=clients.sharefile, policy=settings.policy(), stamp=stamp
        )
        submit = SubmitHandler(sm=clients.sm, stamp=stamp)
        started = time.perf_counter()
        # The original utility listed the customers first, as the scheduler does.
        listed = sum(1 for _ in clients.sm.list_customers())
        for customer in chosen:
            command = stamp(
                SyncCommand(customer_id=customer.id, run_id="sequential"),
                correlation_id="sequential",
            )
            for output in sync.handle(command):
                if output.type == "provisioning.requested":
                    submit.handle(output)
        seconds = time.perf_counter() - started
        clients.close()
    assert listed == len(enabled)
    per_customer = seconds / len(chosen)
    fleet = seconds if mode == "full" else per_customer * len(enabled)
    users = sum(len(c.sm_users) for c in chosen)
    return Sequential(mode, len(chosen), users, per_customer, fleet)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


# As the product's clients do, the floor tries a dropped connection or a 5xx again (a 10,000-
# customer floor once died on one RemoteDisconnected); the retry machinery only on a failure.
FLOOR_RETRY = Retrying(
    retry=retry_if_exception(_retryable),
    stop=stop_after_attempt(5),
    wait=wait_fixed(0.2),
    reraise=True,
)


def json_of(send: Callable[..., httpx.Response], url: str, **kwargs: Any) -> Any:
    """The JSON of a successful answer to `send(url, **kwargs)`, tried again if transient."""

    def once() -> Any:
        response = send(url, **kwargs)
        response.raise_for_status()
        return response.json()

    try:
        return once()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        if not _retryable(exc):
            raise
    return FLOOR_RETRY.copy()(once)


@dataclass
class Floor:
    seconds: float
    # CPU seconds during the floor: "floor" is this process (the loop), "simulator" the APIs'.
    cpu_s: dict[str, float]


class PageFetcher:
    """What the floor does for one customer: fetch every page a worker fetches, with a bare
    httpx client (JSON decoded, nothing parsed into users, nothing reconciled or published):
    the customer, its Services Manager user pages, a ShareFile token and the employee pages
    with the same $select; and those pages once more for the customers in `rereads`, whose
    feed the worker reads twice (see `rereads_of`)."""

    def __init__(
        self,
        http: httpx.Client,
        env: dict[str, str],
        sm_token: str,
        rereads: frozenset[str] = frozenset(),
    ) -> None:
        self.http = http
        self.sm_url = env["SFSYNC_SM_URL"]
        self.sm_auth = {"Authorization": f"Bearer {sm_token}"}
        self.token_url = env["SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE"]
        self.api_url = env["SFSYNC_SHAREFILE_API_URL_TEMPLATE"]
        self.page_size = settings_of(env).sm_page_size
        self.rereads = rereads

    def pages(self, url: str) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            params = {"limit": self.page_size, **({"cursor": cursor} if cursor else {})}
            page = json_of(self.http.get, url, params=params, headers=self.sm_auth)
            yield page
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def enabled_customers(self) -> list[dict[str, Any]]:
        customers = [
            item for page in self.pages(f"{self.sm_url}/customers") for item in page["items"]
        ]
        return [c for c in customers if c["sharefile"]["enabled"]]

    def fetch(self, customer: dict[str, Any]) -> None:
        http, sm_url = self.http, self.sm_url
        subdomain = customer["sharefile"]["subdomain"]
        json_of(http.get, f"{sm_url}/customers/{customer['id']}", headers=self.sm_auth)
        for _ in self.pages(f"{sm_url}/customers/{customer['id']}/users"):
            pass
        form = {"grant_type": "password", **CREDENTIALS}
        token = json_of(http.post, self.token_url.format(subdomain=subdomain), data=form)
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        api = self.api_url.format(subdomain=subdomain)
        first = f"{api}Accounts/Employees?$select={SELECTED_FIELDS}"
        for _ in range(2 if customer["id"] in self.rereads else 1):
            url: str | None = first
            while url:
                url = json_of(http.get, url, headers=auth).get("odata.nextLink")


def io_floor(args: argparse.Namespace, scenario: Scenario, threads: int) -> Floor:
    """Fetch every page the workers fetch, with a bare httpx loop and `threads`: its time, and
    the CPU its own process and the simulator used meanwhile (is the floor waiting or busy?)."""
    with (
        simulator(scenario, args.latency_ms) as sim,
        new_http_client(timeout_s=60, max_connections=max(100, threads * 2)) as http,
    ):
        fetcher = PageFetcher(http, sim.env(), sim.sm_token, rereads_of(scenario))
        meter = CpuMeter({"floor": psutil.Process(), "simulator": psutil.Process(sim.pid)})
        meter.start()
        started = time.perf_counter()
        enabled = fetcher.enabled_customers()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fetcher.fetch, enabled))
        seconds = time.perf_counter() - started
        return Floor(seconds, meter.stop())


# -- the machine's speed at the time of the run --------------------------------------------------

SPEED_LOOP = 10_000_000
SPEED_REQUESTS = 2_000


@dataclass
class Speed:
    """How fast this shared machine was at one moment: the fleet goals depend on it.

    `python_loop_s`: CPU seconds of a loop of 10 million additions (pure interpreter speed).
    `request_cpu_us`: this process's CPU per loopback GET through the product's client, one
    thread, no added latency (system calls, wake-ups and the HTTP client: what the floor and the
    workers spend most of their CPU on). Each is the median of three measurements.
    """

    python_loop_s: float
    request_cpu_us: float


def _python_loop_s() -> float:
    started = time.process_time()
    total = 0
    for i in range(SPEED_LOOP):
        total += i
    assert total == SPEED_LOOP * (SPEED_LOOP - 1) // 2
    return time.process_time() - started


def machine_speed(scenario: Scenario) -> Speed:
    loops = [_python_loop_s() for _ in range(3)]
    customer = next(c for c in scenario.customers if c.sharefile_enabled)
    with simulator(scenario, latency_ms=0) as sim:
        url = f"{sim.env()['SFSYNC_SM_URL']}/customers/{customer.id}"
        auth = {"Authorization": f"Bearer {sim.sm_token}"}
        with new_http_client(timeout_s=60) as http:
            http.get(url, headers=auth).raise_for_status()  # the connection is open
            requests = []
            for _ in range(3):
                started = time.process_time()
                for _ in range(SPEED_REQUESTS):
                    http.get(url, headers=auth).raise_for_status()
                requests.append((time.process_time() - started) / SPEED_REQUESTS * 1e6)
    return Speed(statistics.median(loops), statistics.median(requests))


# -- the report --------------------------------------------------------------------------------


def describe(scenario: Scenario) -> dict[str, Any]:
    sizes = [len(c.sm_users) for c in scenario.customers]
    return {
        "customers": len(sizes),
        "enabled": sum(1 for c in scenario.customers if c.sharefile_enabled),
        "users": sum(sizes),
        "median_users": statistics.median(sizes),
        "max_users": max(sizes),
        "large_customers": sum(1 for s in sizes if s >= 5000),
    }


class _Timed(Protocol):
    seconds: float


_Run = TypeVar("_Run", bound=_Timed)


def nearest(runs: list[_Run], seconds: float) -> _Run:
    """The run whose time is nearest to `seconds` (the median run, for an odd count)."""
    return min(runs, key=lambda run: abs(run.seconds - seconds))


def measure_fleet(args: argparse.Namespace, customers: int) -> dict[str, Any]:
    print(f"generating {customers:,} customers ...", file=sys.stderr)
    scenario = generate_fleet(
        customers,
        seed=args.seed,
        median_users=args.median_users,
        drift=args.drift,
        large_share=args.large_share,
    )
    fleet = describe(scenario)
    print(f"  {fleet}", file=sys.stderr)
    print("  the machine's speed ...", file=sys.stderr)
    speed_before = machine_speed(scenario)
    print(f"    {speed_before}", file=sys.stderr)
    print("  sequential baseline ...", file=sys.stderr)
    seq = sequential(args, scenario)
    floors: list[dict[str, Any]] = []
    cycles: list[dict[str, Any]] = []
    for workers in args.workers:
        threads = workers * args.concurrency
        # Floor and cycle alternate, and each cycle is compared with the floor measured just
        # before it: a shared machine that slows down for a few minutes then slows both sides
        # of a pair, instead of only the block of floors or only the block of cycles.
        measured_floors: list[Floor] = []
        measured: list[Cycle] = []
        for _ in range(args.repeat):
            print(f"  I/O floor, {threads} threads ...", file=sys.stderr)
            measured_floors.append(io_floor(args, scenario, threads))
            print(f"    {measured_floors[-1]}", file=sys.stderr)
            print(f"  cycle, {workers} worker(s) x {args.concurrency} threads ...", file=sys.stderr)
            measured.append(cycle(args, scenario, workers, args.profile))
            print(f"    {measured[-1]}", file=sys.stderr)
        runs = [f.seconds for f in measured_floors]
        floor = statistics.median(runs)
        middle_floor = nearest(measured_floors, floor)
        floors.append(
            {
                "workers": workers,
                "threads": threads,
                "seconds": floor,
                "runs": runs,
                # The speed-up of the bare loop itself over the sequential baseline.
                "speedup_vs_sequential": seq.fleet_s / floor,
                # The floor whose time is the median: CPU of its loop's process and the simulator.
                "cpu_s": middle_floor.cpu_s,
                "cpu_runs": [f.cpu_s for f in measured_floors],
            }
        )
        ratios = [c.seconds / f for c, f in zip(measured, runs, strict=True)]
        seconds = statistics.median(c.seconds for c in measured)
        middle = nearest(measured, seconds)
        cycles.append(
            {
                "workers": workers,
                "threads": threads,
                "seconds": seconds,
                "runs": [c.seconds for c in measured],
                "exact": all(c.exact for c in measured),
                "cpu_s": middle.cpu_s,
                "speedup_vs_sequential": seq.fleet_s / seconds,
                # The median of the pairs' ratios (cycle / the floor measured just before it).
                "vs_floor": statistics.median(ratios),
                "vs_floor_runs": ratios,
                "per_customer_ms": 1000 * seconds / customers,
                "per_1000_users_ms": 1000 * seconds / fleet["users"] * 1000,
            }
        )
    print("  the machine's speed ...", file=sys.stderr)
    speed_after = machine_speed(scenario)
    print(f"    {speed_after}", file=sys.stderr)
    return {
        "fleet": fleet,
        # At the start and at the end of the fleet's measurements.
        "machine_speed": [vars(speed_before), vars(speed_after)],
        "sequential": vars(seq),
        "floors": floors,
        "cycles": cycles,
    }


def print_tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(
        f"\nsync cycle through RabbitMQ, simulators at {args.latency_ms:g} ms per call, "
        f"{args.concurrency} threads per worker process (median of {args.repeat})"
    )
    header = (
        f"{'customers':>9} {'workers':>7} {'cycle s':>8} {'end state':>9} {'sequential s':>14} "
        f"{'speed-up':>8} {'floor s':>8} {'/floor':>6} {'floor speed-up':>14}"
    )
    print(header)
    for fleet in results:
        seq = fleet["sequential"]
        label = f"{seq['fleet_s']:.1f}" + ("" if seq["mode"] == "full" else "*")
        for run, floor in zip(fleet["cycles"], fleet["floors"], strict=True):
            print(
                f"{fleet['fleet']['customers']:>9,} {run['workers']:>7} {run['seconds']:>8.1f} "
                f"{'exact' if run['exact'] else 'MISMATCH':>9} {label:>14} "
                f"{run['speedup_vs_sequential']:>7.1f}x {floor['seconds']:>8.1f} "
                f"{run['vs_floor']:>5.2f}x {floor['speedup_vs_sequential']:>13.1f}x"
            )
    print("goals: speed-up >= 20x over sequential, cycle <= 1.5x the I/O floor")
    print("/floor: the median of the ratios of each cycle to the floor measured just before it")
    print("floor speed-up: the bare loop's own speed-up over sequential (a cycle at 1x its floor)")
    for fleet in results:
        seq = fleet["sequential"]
        if seq["mode"] == "sample":
            print(
                f"* {fleet['fleet']['customers']:,} customers: sequential extrapolated from a "
                f"random sample of {seq['customers']} customers ({seq['per_customer_s'] * 1000:.0f}"
                f" ms per customer)"
            )
    print("\nthe machine's speed at the start / end of each fleet (the goals depend on it)")
    for fleet in results:
        before, after = fleet["machine_speed"]
        print(
            f"{fleet['fleet']['customers']:>9,}: Python loop of 10M additions "
            f"{before['python_loop_s']:.2f} / {after['python_loop_s']:.2f} s of CPU; one loopback "
            f"request {before['request_cpu_us']:.0f} / {after['request_cpu_us']:.0f} us of "
            "client CPU"
        )
    print("\nscaling: cost per customer and per 1,000 users")
    print(f"{'customers':>9} {'users':>9} {'workers':>7} {'ms/customer':>11} {'ms/1k users':>11}")
    for fleet in results:
        for run in fleet["cycles"]:
            print(
                f"{fleet['fleet']['customers']:>9,} {fleet['fleet']['users']:>9,} "
                f"{run['workers']:>7} {run['per_customer_ms']:>11.2f} "
                f"{run['per_1000_users_ms']:>11.1f}"
            )
    print("\nCPU seconds per process during each cycle and its floor (the median ones)")
    for fleet in results:
        for run, floor in zip(fleet["cycles"], fleet["floors"], strict=True):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(run["cpu_s"].items()))
            print(f"{fleet['fleet']['customers']:>9,} {run['workers']}w cycle: {parts}")
            loop = floor["cpu_s"]["floor"]
            print(
                f"{'':>9} {'':>2} floor: loop {loop:.1f} ({100 * loop / floor['seconds']:.0f} % "
                f"of one core), simulator {floor['cpu_s']['simulator']:.1f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=32, help="threads per process")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--median-users", type=int, default=20)
    parser.add_argument("--large-share", type=float, default=0.002)
    parser.add_argument("--drift", type=float, default=0.03)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sequential-full-max", type=int, default=2000)
    parser.add_argument("--sequential-sample", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write the results there")
    parser.add_argument("--profile", type=Path, help="py-spy every process of each cycle")
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    args = parser.parse_args()
    if args.profile:
        if not Path(sys.executable).with_name("py-spy").exists():
            parser.error("--profile needs py-spy: pip install -e '.[bench]'")
        print("profiling: the cycle timings of this run are slowed down", file=sys.stderr)

    results = [measure_fleet(args, customers) for customers in args.customers]
    print_tables(args, results)
    if args.json:
        write_results(args.json, "fleet_cycle", args, fleets=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
