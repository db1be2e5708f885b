"""Cluster-suite wiring: a 3-node RabbitMQ cluster, worker hosts in network namespaces, TLS.

The session starts `scripts/rabbitmq-cluster` (nodes sfsync-c1..c3@localhost on 5701-5703, AMQPS
on 5711-5713), after the test network (`network.py`: bridge 10.213.0.1/24, hosts .11-.13) that
the nodes listen on, and stops both at the end. Under CI=true anything missing fails the session's
cluster tests; elsewhere they are skipped with the reason (not root, no rabbitmq-server, ...).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from adapters.topology import Topology
from tests.cluster.certs import Certificates, make_certificates
from tests.cluster.network import GATEWAY, Host, NetworkUnavailable, TestNetwork
from tests.conftest import SESSION_PREFIX, delete_topology
from tests.reliability.conftest import (  # noqa: F401 - fixtures shared with the reliability suite
    RoleProcess,
    RoleProcesses,
    earlier_leaks_collected,
    no_stray_settings,
    start_sims,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-cluster"
NODES = (1, 2, 3)
BASE_PORT = 5701
# One cluster suite at a time on a machine: node names, ports and namespaces are fixed.
SESSION_LOCK = Path(tempfile.gettempdir()) / "sfsync-cluster-tests.lock"
LOCK_WAIT_S = 600
READY_LINE = re.compile(r"RabbitMQ ready at \S+?:(\d+)/")

# Recovery figures the tests measured, printed at the end of the session (docs/deployment.md).
FIGURES: list[str] = []


def record(figure: str) -> None:
    FIGURES.append(figure)
    print(figure)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("cluster suite: measured recovery")
        for line in FIGURES:
            terminalreporter.write_line(line)


def _unavailable(reason: str) -> None:
    """Under CI a missing capability is a failure; elsewhere the cluster tests are skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"cluster suite cannot run: {reason}")
    pytest.skip(f"cluster suite needs {reason}")


@dataclass
class Cluster:
    """The running cluster, as the tests (root namespace) and the worker hosts reach it."""

    folder: Path
    password: str
    env: dict[str, str]

    def url(self, node: int, host: str = "127.0.0.1") -> str:
        return f"amqp://sfsync:{self.password}@{host}:{BASE_PORT + node - 1}/"

    def tls_url(self, node: int, host: str = "127.0.0.1") -> str:
        return f"amqps://sfsync:{self.password}@{host}:{BASE_PORT + node + 9}/"

    def urls(self, host: str = "127.0.0.1") -> str:
        """SFSYNC_BROKER_URL for every node."""
        return ",".join(self.url(n, host) for n in NODES)

    @staticmethod
    def node_of_port(port: int) -> int:
        return port - BASE_PORT + 1

    def script(self, *args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmq-cluster {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def stop_node(self, node: int) -> None:
        self.script("stop-node", str(node))

    def kill_node(self, node: int) -> None:
        self.script("kill-node", str(node))

    def start_node(self, node: int) -> None:
        self.script("start-node", str(node))

    def ctl(self, node: int, *args: str) -> str:
        """rabbitmqctl against one node (quiet, tab-separated rows)."""
        return subprocess.run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", "-n", f"sfsync-c{node}@localhost", *args],
            env={**os.environ, "HOME": str(self.folder)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    def queue_leaders(self, node: int, prefix: str) -> dict[str, tuple[str, list[str]]]:
        """queue -> (leader, members) for the quorum queues of one deployment."""
        rows = self.ctl(node, "list_queues", "name", "leader", "members", "--no-table-headers")
        found = {}
        for line in rows.splitlines():
            parts = line.split("\t")
            if parts[0].startswith(prefix) and len(parts) == 3:
                members = re.findall(r"sfsync-c\d@localhost", parts[2])
                found[parts[0]] = (parts[1], members)
        return found


@pytest.fixture(scope="session")
def cluster_lock() -> Iterator[None]:
    SESSION_LOCK.touch(exist_ok=True)
    with open(SESSION_LOCK) as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another cluster suite held {SESSION_LOCK} for {LOCK_WAIT_S}s")
                time.sleep(1)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def network(cluster_lock: None) -> Iterator[TestNetwork]:
    if os.geteuid() != 0:
        _unavailable("root (network namespaces, veth, tc)")
    net = TestNetwork(3)
    try:
        net.check()
        net.open()
    except (NetworkUnavailable, subprocess.CalledProcessError) as exc:
        net.close()
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        _unavailable(f"network namespaces: {detail}")
    yield net
    net.close()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        _unavailable("the openssl command line tool (Debian package openssl)")
    return make_certificates(tmp_path_factory.mktemp("tls"), ["127.0.0.1", GATEWAY])


@pytest.fixture(scope="session")
def cluster(network: TestNetwork, certificates: Certificates) -> Iterator[Cluster]:
    if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        _unavailable("rabbitmq-server (Debian package rabbitmq-server)")
    folder = Path(tempfile.gettempdir()) / "sfsync-test-cluster"
    env = {
        "SFSYNC_CLUSTER_DIR": str(folder),
        "SFSYNC_CLUSTER_BASE_PORT": str(BASE_PORT),
        "SFSYNC_CLUSTER_BIND": f"127.0.0.1,{GATEWAY}",
        "SFSYNC_CLUSTER_TLS_DIR": str(certificates.folder),
    }
    handle = Cluster(folder=folder, password="", env=env)
    started = time.monotonic()
    try:
        handle.script("stop")  # an interrupted session's nodes, if any
        handle.script("start", timeout=300)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the RabbitMQ cluster did not start: {exc}")
        pytest.skip(f"the RabbitMQ cluster did not start: {exc}")
    handle.password = (folder / "password").read_text().strip()
    record(f"cluster start (3 nodes, joined): {time.monotonic() - started:.1f}s")
    yield handle
    handle.script("stop")


@pytest.fixture
def cluster_topology(cluster: Cluster) -> Iterator[Topology]:
    """A unique prefix on the cluster; every queue of it is deleted afterwards."""
    topo = Topology(prefix=f"{SESSION_PREFIX}-{uuid.uuid4().hex[:6]}")
    yield topo
    for node in NODES:  # through any node that is up
        try:
            delete_topology(cluster.url(node), topo)
            return
        except Exception as exc:  # noqa: BLE001 - a node down is why we try the next one
            last = exc
    raise AssertionError(f"could not delete the test queues: {last!r}")


# -- worker processes on the hosts -------------------------------------------------------------


@dataclass
class HostProcess(RoleProcess):
    host: Host = field(default=Host(0))

    def node(self) -> int | None:
        """The node it last became ready on, from its log."""
        found = READY_LINE.findall(self.log())
        return Cluster.node_of_port(int(found[-1])) if found else None

    def readies(self) -> int:
        return len(READY_LINE.findall(self.log()))

    def planned(self) -> int:
        return self.log().count("planned ")


class HostProcesses(RoleProcesses):
    """`python -m sfsync <role>` inside a host's namespace; stopped like RoleProcesses."""

    def start_on(self, host: Host, role: str = "worker", *args: str) -> HostProcess:
        log_path = self.log_dir / f"{role}-{host.namespace}-{len(self.started)}.log"
        log_file: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            host.command([sys.executable, "-m", "sfsync", role, *args]),
            env={**os.environ, **self.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        started = HostProcess(role, proc, log_path, log_file, host=host)
        self.started.append(started)
        return started


@pytest.fixture
def host_processes(tmp_path: Path) -> Iterator[HostProcesses]:
    procs = HostProcesses(tmp_path)
    yield procs
    procs.stop_all()
