"""Reliability-suite wiring: role processes, simulators, chaos on RabbitMQ, and the run oracle.

Every helper here either waits with tenacity or cleans up after itself: a test that fails half-way
leaves no process running and no queue of its own behind (the `topology` fixture deletes them).
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlparse

import httpx
import pika
import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.amqp import PREFIX_PROPERTY
from adapters.topology import Topology
from consumers.run_tracker import RunTracker
from sfsync.bootstrap import Roles, running, track_run
from sfsync.settings import Settings
from simulators import Faults, Scenario, SimulatorServers

# Lines an AmqpBroker logs when it loses its connection (and only then).
RECONNECT_LINE = re.compile(r"RabbitMQ connection (lost|closed)")


def eventually(condition: Callable[[], Any], seconds: float = 60.0, every: float = 0.1) -> None:
    """Wait until `condition()` is truthy, or fail with its last assertion."""
    for attempt in Retrying(stop=stop_after_delay(seconds), wait=wait_fixed(every), reraise=True):
        with attempt:
            assert condition()


@pytest.fixture
def earlier_leaks_collected() -> None:
    """Collect the garbage of earlier tests before this one starts, reporting (not raising) the
    unraisable exceptions it holds, e.g. a ResourceWarning for a socket an earlier test leaked.

    Under `-W error` pytest fails whichever test happens to be running when the garbage collector
    finds someone else's leak; these chaos tests allocate enough to trigger it. A leak made
    before this test started is not its failure; it is still printed, with its origin.
    """

    def report(unraisable: Any) -> None:
        print(f"leak from an earlier test: {unraisable.exc_value!r}", file=sys.stderr)

    hook = sys.unraisablehook
    sys.unraisablehook = report
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the caller's SFSYNC_* variables nor a .env file may steer these tests."""
    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- simulators --------------------------------------------------------------------------------


@pytest.fixture
def start_sims() -> Iterator[Callable[..., SimulatorServers]]:
    """Start simulators over a scenario (fast by default); all are stopped after the test."""
    started: list[SimulatorServers] = []

    def start(
        scenario: Scenario,
        *,
        before_start: Callable[[SimulatorServers], None] | None = None,
        **options: Any,
    ) -> SimulatorServers:
        options.setdefault("sm_faults", Faults(latency_ms=1))
        options.setdefault("sharefile_faults", Faults(latency_ms=1))
        options.setdefault("sharefile_page_size", 50)
        sims = SimulatorServers(scenario, **options)
        if before_start is not None:
            before_start(sims)
        started.append(sims)
        sims.start()
        return sims

    yield start
    for sims in started:
        sims.stop()


def enabled_ids(scenario: Scenario) -> set[str]:
    return {c.id for c in scenario.customers if c.sharefile_enabled}


def assert_exact_end_state(sims: SimulatorServers, scenario: Scenario) -> None:
    """The oracle: SM ends exactly as the fleet generator predicted, and no change was asked
    for twice through two different requests, nor any request accepted twice as new."""
    assert sims.sm_states() == scenario.expected
    assert sims.duplicate_effective_submissions() == 0
    first_time = [s["request_id"] for s in sims.submissions() if not s["replayed"]]
    assert len(first_time) == len(set(first_time)), "a request_id was accepted twice as new"


# -- role processes ----------------------------------------------------------------------------


@dataclass
class RoleProcess:
    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no acks, no goodbye to RabbitMQ."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


class RoleProcesses:
    """`python -m sfsync <role>` processes of one test; all are stopped (or killed) at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.env: dict[str, str] = {}
        self.log_dir = log_dir
        self.started: list[RoleProcess] = []

    def start(self, role: str, *args: str) -> RoleProcess:
        log_path = self.log_dir / f"{role}-{len(self.started)}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            [sys.executable, "-m", "sfsync", role, *args],
            env={**os.environ, **self.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        started = RoleProcess(role, proc, log_path, log_file)
        self.started.append(started)
        return started

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.started)

    def stop_all(self) -> list[int]:
        """SIGTERM every live process, SIGKILL what does not exit within 30 s; exit codes."""
        for started in self.started:
            if started.proc.poll() is None:
                started.proc.send_signal(signal.SIGTERM)
        codes = []
        for started in self.started:
            try:
                codes.append(started.proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                started.proc.kill()
                codes.append(started.proc.wait())
            started.log_file.close()
        return codes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[RoleProcesses]:
    procs = RoleProcesses(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def amqp_env(amqp_url: str, topology: Topology) -> dict[str, str]:
    return {
        "SFSYNC_BROKER_URL": amqp_url,
        "SFSYNC_PREFIX": topology.prefix,
        "SFSYNC_LOG_LEVEL": "INFO",
    }


# -- RabbitMQ, from the outside ----------------------------------------------------------------


def _management_url(amqp_url: str) -> str | None:
    """The management API next to the broker, if it answers (RABBITMQ_MANAGEMENT_URL, else the
    AMQP host on port 15672 with the AMQP credentials)."""
    url = os.environ.get("RABBITMQ_MANAGEMENT_URL")
    if url is None:
        parsed = urlparse(amqp_url)
        url = f"http://{parsed.username or 'guest'}:{parsed.password or 'guest'}@"
        url += f"{parsed.hostname or '127.0.0.1'}:15672"
    try:
        httpx.get(f"{url}/api/overview", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    return url


class ConnectionCloser:
    """Finds and closes the connections of one deployment (by their `sfsync_prefix` client
    property), as a broker restart would, leaving every other user of the broker alone.

    Uses the management API when it answers (milliseconds), else `rabbitmqctl`, whose start-up
    takes seconds on a loaded machine: long enough for a short cycle to finish meanwhile.
    """

    def __init__(self, amqp_url: str, topology: Topology) -> None:
        self.prefix = topology.prefix
        self.management = _management_url(amqp_url)

    def connections(self) -> dict[str, str]:
        """id -> connection_name of every connection of this deployment."""
        if self.management is not None:
            listed = httpx.get(
                f"{self.management}/api/connections",
                params={"columns": "name,client_properties"},
                timeout=10,
            ).json()
            return {
                c["name"]: props.get("connection_name", "")
                for c in listed
                if (props := c.get("client_properties") or {}).get(PREFIX_PROPERTY) == self.prefix
            }
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return {
            line.split()[0]: properties["connection_name"]
            for line in out.splitlines()
            if (properties := client_properties(line)).get(PREFIX_PROPERTY) == self.prefix
        }

    def close_all(self, reason: str = "chaos test") -> set[str]:
        """Close every connection of this deployment at once; the ids of those it closed."""
        found = list(self.connections())
        if self.management is not None:
            return {
                key
                for key in found
                if httpx.delete(
                    f"{self.management}/api/connections/{quote(key, safe='')}",
                    headers={"X-Reason": reason},
                    timeout=10,
                ).status_code
                == 204
            }
        closing = {
            pid: subprocess.Popen(
                ["rabbitmqctl", "-q", "close_connection", pid, reason],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid in found
        }
        return {pid for pid, proc in closing.items() if proc.wait(timeout=60) == 0}

    def wait_reconnected(self, count: int, closed: set[str], seconds: float = 30.0) -> None:
        """Wait until `count` connections are open again, none of them one that was closed.
        (The management API lists a new connection with its first statistics, within seconds.)"""

        def back() -> bool:
            now = self.connections()
            # Said in full when it fails: a flaky failure must show which half did not hold.
            assert len(now) == count and not now.keys() & closed, (
                f"{len(now)} connections listed, {count} wanted: {sorted(now.values())}; "
                f"still listed from before the close: {sorted(now.keys() & closed)}"
            )
            return True

        eventually(back, seconds, every=0.2)


def client_properties(line: str) -> dict[str, str]:
    """The string-valued client properties in one line of `rabbitmqctl list_connections`."""
    return dict(re.findall(r'\{"([^"]+)","([^"]*)"\}', line))


def heartbeats(topology: Topology) -> dict[str, int]:
    """connection_name -> the heartbeat interval (s) RabbitMQ agreed with each of our roles."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "timeout", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    found = {}
    for line in out.splitlines():
        properties = client_properties(line)
        if properties.get(PREFIX_PROPERTY) == topology.prefix:
            found[properties["connection_name"]] = int(line.split()[0])
    return found


def connection_states(topology: Topology) -> list[str]:
    """The state ("running", "closing", ...) of each connection of this deployment, from
    rabbitmqctl, which asks the broker's connection processes themselves (no statistics lag)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "state", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [
        line.split()[0]
        for line in out.splitlines()
        if client_properties(line).get(PREFIX_PROPERTY) == topology.prefix
    ]


@pytest.fixture
def closer(amqp_url: str, topology: Topology) -> ConnectionCloser:
    return ConnectionCloser(amqp_url, topology)


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def consumer_count(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    finally:
        connection.close()


def wait_consuming(amqp_url: str, queue: str, consumers: int, seconds: float = 60.0) -> None:
    eventually(lambda: consumer_count(amqp_url, queue) >= consumers, seconds=seconds, every=0.2)


def drain(amqp_url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Take every message off `queue`: (body, headers) in queue order."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    found = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((body, dict(properties.headers or {})))
    finally:
        connection.close()


# -- one run, driven and followed from the test process ----------------------------------------


@dataclass
class Cycle:
    """A run started by an in-process scheduler and followed by a RunTracker."""

    run_id: str
    tracker: RunTracker
    roles: Roles
    start: Callable[[], None]

    def reported(self) -> int:
        return self.tracker.progress().reported


@contextmanager
def cycle(
    settings: Settings,
    *,
    submitter: bool = False,
    worker: bool = False,
    name: str = "sfsync-test",
    customer_ids: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Iterator[Cycle]:
    """Roles in this process (a scheduler, optionally a submitter and a worker) on one broker,
    listening to a fresh run's events before anything is published."""
    run_id = f"run-{uuid.uuid4().hex[:10]}"
    with running(
        settings,
        scheduler=True,
        submitter=submitter,
        worker=worker,
        name=name,
        overrides=overrides,
    ) as roles:
        scheduler = roles.scheduler
        assert scheduler is not None
        tracker, listener = track_run(roles, settings, run_id)

        def start() -> None:
            scheduler.run_once(run_id=run_id, customer_ids=customer_ids, on_listed=tracker.expect)

        try:
            yield Cycle(run_id=run_id, tracker=tracker, roles=roles, start=start)
        finally:
            listener.stop()
