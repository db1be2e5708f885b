"""Measures the simulators' requests/s against a bare starlette+uvicorn baseline in the same run.

Each server runs in its own process, on loopback. The load comes from `wrk` (Debian's package)
when it is installed, since a Python client on this 2-core machine saturates before the server
does; else (or with --client httpx) from a threaded httpx client (16 threads, one connection pool
each) sending a few thousand requests per workload. The baseline serves the very bytes the
simulator answered, as a constant.

    .venv/bin/python bench/simulator_throughput.py [--client wrk|httpx] [--requests 4000]
                                                   [--concurrency 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import httpx

SM_PAGE = 50  # users per SM page: "small pages", the per-request overhead dominates
SHAREFILE_PAGE = 50
SCENARIO_CUSTOMERS = 20


def _serve_simulators(conn: Connection) -> None:
    from simulators import SimulatorServers, generate_fleet

    scenario = generate_fleet(SCENARIO_CUSTOMERS, seed=1, big_customer_users=5000)
    with SimulatorServers(scenario, sharefile_page_size=SHAREFILE_PAGE) as servers:
        conn.send(
            {
                "sm_url": servers.sm_url,
                "sm_token": servers.sm_token,
                "token_url": servers.sharefile_token_url_template,
                "api_url": servers.sharefile_api_url_template,
                "credentials": servers.sharefile_credentials,
                "customer_id": scenario.customers[0].id,
                "subdomain": scenario.customers[0].subdomain,
            }
        )
        _answer_cpu_queries(conn)


def _serve_baseline(conn: Connection, bodies: dict[str, bytes]) -> None:
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def constant(body: bytes):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            return Response(body, media_type="application/json")

        return endpoint

    app = Starlette(routes=[Route(f"/{name}", constant(body)) for name, body in bodies.items()])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    conn.send(f"http://127.0.0.1:{sock.getsockname()[1]}")

    def control() -> None:
        _answer_cpu_queries(conn)
        server.should_exit = True

    threading.Thread(target=control).start()
    server.run(sockets=[sock])


def _answer_cpu_queries(conn: Connection) -> None:
    """Answer "cpu" with this process's CPU seconds so far; return on "stop"."""
    while conn.recv() == "cpu":
        conn.send(time.process_time())


@dataclass
class Measurement:
    requests_per_s: float
    server_cpu_us: float  # server CPU time per request: its capacity is 1e6 / this per core
    p50_ms: float
    p99_ms: float
    bytes_per_answer: int


def _hammer(
    url: str, headers: dict[str, str], requests: int, concurrency: int, server: Connection
) -> Measurement:
    latencies: list[float] = []
    sizes: list[int] = []
    lock = threading.Lock()
    per_thread = requests // concurrency

    def worker() -> None:
        mine: list[float] = []
        with httpx.Client(trust_env=False, headers=headers, timeout=30) as client:
            for _ in range(20):  # warm the connection
                client.get(url).raise_for_status()
            barrier.wait()
            for _ in range(per_thread):
                started = time.perf_counter()
                answer = client.get(url)
                mine.append(time.perf_counter() - started)
                answer.raise_for_status()
            size = len(answer.content)
        with lock:
            latencies.extend(mine)
            sizes.append(size)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    server.send("cpu")
    cpu_before = server.recv()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    server.send("cpu")
    # Includes the warm-up requests' share only if a thread was still warming up: none is,
    # every thread passed the barrier first.
    server_cpu = server.recv() - cpu_before
    latencies.sort()
    return Measurement(
        requests_per_s=len(latencies) / elapsed,
        server_cpu_us=server_cpu / len(latencies) * 1e6,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] * 1000,
        bytes_per_answer=sizes[0],
    )


def _hammer_wrk(
    url: str, headers: dict[str, str], seconds: float, concurrency: int, server: Connection
) -> Measurement:
    """The same measurement with wrk as the client (C, event-driven: not the bottleneck)."""
    command = ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:.0f}s", "--latency", url]
    for name, value in headers.items():
        command[1:1] = ["-H", f"{name}: {value}"]
    size = len(httpx.get(url, headers=headers, trust_env=False).content)
    server.send("cpu")
    cpu_before = server.recv()
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    server.send("cpu")
    server_cpu = server.recv() - cpu_before
    if "Non-2xx" in output:
        raise RuntimeError(f"wrk saw error answers:\n{output}")
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]

    def percentile(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return Measurement(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        server_cpu_us=server_cpu / total * 1e6,
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
        bytes_per_answer=size,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per workload, with wrk")
    parser.add_argument(
        "--client", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx"
    )
    args = parser.parse_args()

    def hammer(url: str, headers: dict[str, str], server: Connection) -> Measurement:
        if args.client == "wrk":
            return _hammer_wrk(url, headers, args.seconds, args.concurrency * 2, server)
        return _hammer(url, headers, args.requests, args.concurrency, server)

    context = multiprocessing.get_context("spawn")

    parent, child = context.Pipe()
    simulators = context.Process(target=_serve_simulators, args=(child,), daemon=True)
    simulators.start()
    info = parent.recv()
    sm_headers = {"Authorization": f"Bearer {info['sm_token']}"}
    sm_url = f"{info['sm_url']}/customers/{info['customer_id']}/users?limit={SM_PAGE}"
    token = httpx.post(
        info["token_url"].format(subdomain=info["subdomain"]),
        data={"grant_type": "password", **info["credentials"]},
        trust_env=False,
    ).json()["access_token"]
    sf_headers = {"Authorization": f"Bearer {token}"}
    sf_url = info["api_url"].format(subdomain=info["subdomain"]) + "Accounts/Employees"
    bodies = {
        "sm": httpx.get(sm_url, headers=sm_headers, trust_env=False).content,
        "sharefile": httpx.get(sf_url, headers=sf_headers, trust_env=False).content,
    }
    results = {
        "sm": hammer(sm_url, sm_headers, parent),
        "sharefile": hammer(sf_url, sf_headers, parent),
    }
    parent.send("stop")
    simulators.join(10)

    parent, child = context.Pipe()
    baseline = context.Process(target=_serve_baseline, args=(child, bodies), daemon=True)
    baseline.start()
    root = parent.recv()
    baselines = {name: hammer(f"{root}/{name}", {}, parent) for name in bodies}
    parent.send("stop")
    baseline.join(10)

    labels = {
        "sm": f"SM users page (limit={SM_PAGE})",
        "sharefile": f"ShareFile Employees page ({SHAREFILE_PAGE} items)",
    }
    load = (
        f"wrk, {args.concurrency * 2} connections, {args.seconds:.0f} s per workload"
        if args.client == "wrk"
        else f"httpx, {args.requests} requests per workload, {args.concurrency} threads"
    )
    print(
        f"client: {load}; loopback; each server in its own process; "
        "cap/core = 1e6 / server CPU us per request"
    )
    header = (
        f"{'workload':<36} {'bytes':>6} {'sim req/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'sim cpu/req':>11} {'sim cap/core':>12} {'base req/s':>11} {'base cpu/req':>12} "
        f"{'base cap/core':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, label in labels.items():
        sim, base = results[name], baselines[name]
        print(
            f"{label:<36} {sim.bytes_per_answer:>6} {sim.requests_per_s:>10.0f} "
            f"{sim.p50_ms:>7.2f} {sim.p99_ms:>7.2f} {sim.server_cpu_us:>9.0f}us "
            f"{1e6 / sim.server_cpu_us:>12.0f} {base.requests_per_s:>11.0f} "
            f"{base.server_cpu_us:>10.0f}us {1e6 / base.server_cpu_us:>13.0f}"
        )


if __name__ == "__main__":
    main()
