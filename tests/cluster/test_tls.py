"""amqps:// for real: the cluster's TLS listeners verify the client's certificate, roles verify the
broker's, and a wrong CA or a missing client certificate stops a role with one clear line."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from adapters.broker import Outgoing
from domain.errors import ConfigError
from sfsync.bootstrap import build_broker
from sfsync.settings import load_settings
from tests.cluster.certs import Certificates
from tests.cluster.conftest import Cluster
from tests.cluster.network import GATEWAY
from tests.reliability.conftest import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.broker]


def test_a_role_connects_over_amqps_with_a_client_certificate_and_round_trips_a_message(
    cluster: Cluster, certificates: Certificates, cluster_topology
) -> None:
    settings = load_settings(
        broker_url=f"{cluster.tls_url(2)},{cluster.tls_url(3, GATEWAY)}",
        prefix=cluster_topology.prefix,
        broker_ca_file=certificates.ca,
        broker_cert_file=certificates.client_cert,
        broker_key_file=certificates.client_key,
    )
    broker = build_broker(settings, name="sfsync-tls-test")
    broker.start()
    try:
        got = []
        spec = next(q for q in cluster_topology.queues() if q.name == cluster_topology.sync_queue)
        broker.publish([Outgoing("sync.command", b'{"tls": true}', "m-1", "c-1", "sync.command")])
        broker.consume(spec, lambda d: (got.append(d.body), d.ack()), prefetch=1)
        eventually(lambda: got == [b'{"tls": true}'], 15)
        # The broker's view: this connection is TLS, and it presented our client certificate.
        rows = cluster.ctl(1, "list_connections", "ssl", "peer_cert_subject", "client_properties")
        ours = [r for r in rows.splitlines() if "sfsync-tls-test" in r]
        assert ours and all(r.startswith("true") and "CN=sfsync-worker" in r for r in ours), rows
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("ca", "with_client_cert", "expected"),
    [
        ("other_ca", True, "the broker's certificate was not accepted"),
        ("ca", False, "certificate required"),
    ],
    ids=["wrong-ca", "no-client-certificate"],
)
def test_a_tls_mistake_fails_at_once_with_a_clear_error(
    cluster: Cluster,
    certificates: Certificates,
    cluster_topology,
    ca: str,
    with_client_cert: bool,
    expected: str,
) -> None:
    options = {
        "broker_url": cluster.tls_url(1),
        "prefix": cluster_topology.prefix,
        "broker_ca_file": getattr(certificates, ca),
    }
    if with_client_cert:
        options.update(
            broker_cert_file=certificates.client_cert, broker_key_file=certificates.client_key
        )
    broker = build_broker(load_settings(**options), name="sfsync-tls-mistake")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        broker.start(timeout_s=30)
    # Not after the start-up timeout, and not by retrying forever: the first handshake says it.
    assert time.monotonic() - started < 10
    assert expected in str(error.value)
    assert cluster.password not in str(error.value)
    assert "amqps://sfsync:***@127.0.0.1:5711/" in str(error.value)


def test_the_worker_command_with_a_wrong_ca_exits_2_naming_the_problem(
    cluster: Cluster, certificates: Certificates, cluster_topology, tmp_path
) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        '{"*": {"client_id": "a", "client_secret": "b", "username": "c", "password": "d"}}'
    )
    env = {
        "SFSYNC_BROKER_URL": cluster.tls_url(1),
        "SFSYNC_PREFIX": cluster_topology.prefix,
        "SFSYNC_BROKER_CA_FILE": str(certificates.other_ca),
        "SFSYNC_BROKER_CERT_FILE": str(certificates.client_cert),
        "SFSYNC_BROKER_KEY_FILE": str(certificates.client_key),
        "SFSYNC_SM_URL": "http://127.0.0.1:9/api",
        "SFSYNC_SM_TOKEN": "t",
        "SFSYNC_SHAREFILE_CREDENTIALS_FILE": str(credentials),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "sfsync", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("sfsync: ")]
    assert lines[0] == "sfsync: configuration error:"
    assert "the broker's certificate was not accepted" in lines[1]
    assert cluster.password not in done.stderr
