"""Worker hosts on one machine: network namespaces on a bridge of the project's own subnet.

Each host is an `ip netns` namespace with one veth pair: `eth0` inside (10.213.0.1N/24), its peer
`sfs-hN-v` on the bridge `sfs-br0` (10.213.0.1/24) in the root namespace, where the RabbitMQ
nodes and the simulators listen. A host reaches nothing else. Cutting its link is `ip link set
sfs-hN-v down`; slowing it is a token bucket (`tbf`) plus a BPF classifier that drops packets at
random, on both directions of the link (this kernel has no `netem`: see `Impairment`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "sfs-"
BRIDGE = "sfs-br0"
SUBNET = "10.213.0"
GATEWAY = f"{SUBNET}.1"  # the bridge: brokers and simulators listen here
PREFIX_LEN = 24


class NetworkUnavailable(RuntimeError):
    """This machine cannot make namespaced hosts (not root, no iproute2, no veth or bridge)."""


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


@dataclass(frozen=True)
class Impairment:
    """How a slowed link behaves: a rate limit (tbf) and a random loss (BPF, 1 packet in N).

    netem (fixed delay, jitter, loss) would be the usual tool; this kernel is built without
    sch_netem and without loadable modules, so the delay here is the queueing delay of the rate
    limit, and the loss is a tc BPF program compiled with llc.
    """

    rate_kbit: int = 400
    burst_bytes: int = 4096
    # tbf drops what waits longer than this in its queue: more loss under load.
    queue_latency_ms: int = 500
    drop_one_in: int = 0  # 0: no random loss


# A tc classifier in LLVM IR (no C compiler needed): drop when bpf_get_prandom_u32() % N == 0.
# Helper 7 is bpf_get_prandom_u32; TC_ACT_SHOT = 2, TC_ACT_OK = 0.
_LOSS_IR = """\
target datalayout = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"
target triple = "bpf"

define dso_local i32 @drop_some(i8* %skb) section "classifier" {{
entry:
  %fn = inttoptr i64 7 to i32 ()*
  %r = call i32 %fn()
  %m = urem i32 %r, {n}
  %drop = icmp eq i32 %m, 0
  %v = select i1 %drop, i32 2, i32 0
  ret i32 %v
}}

@_license = dso_local global [4 x i8] c"GPL\\00", section "license"
"""


@dataclass(frozen=True)
class Host:
    """One worker host: a namespace with one address on the test network."""

    index: int

    @property
    def namespace(self) -> str:
        return f"{PREFIX}h{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    @property
    def outside(self) -> str:
        """The veth end on the bridge (root namespace)."""
        return f"{PREFIX}h{self.index}-v"

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        """Pull the cable: nothing goes in or out, and nobody is told."""
        run(["ip", "link", "set", self.outside, "down"])

    def reconnect(self) -> None:
        run(["ip", "link", "set", self.outside, "up"])

    def slow(self, impairment: Impairment, workdir: Path) -> None:
        """Rate-limit (and, with `drop_one_in`, randomly drop) both directions of the link."""
        loss = _loss_object(impairment.drop_one_in, workdir) if impairment.drop_one_in else None
        for inside, device in ((True, "eth0"), (False, self.outside)):
            prefix = self.command([]) if inside else []
            run(
                [
                    *prefix,
                    *("tc", "qdisc", "replace", "dev", device, "root", "tbf"),
                    *("rate", f"{impairment.rate_kbit}kbit"),
                    *("burst", str(impairment.burst_bytes)),
                    *("latency", f"{impairment.queue_latency_ms}ms"),
                ]
            )
            if loss is not None:
                run([*prefix, "tc", "qdisc", "replace", "dev", device, "clsact"])
                run(
                    [
                        *prefix,
                        *("tc", "filter", "replace", "dev", device, "egress"),
                        *("bpf", "direct-action", "obj", str(loss), "sec", "classifier"),
                    ]
                )

    def unslow(self) -> None:
        for prefix, device in ((self.command([]), "eth0"), ([], self.outside)):
            run([*prefix, "tc", "qdisc", "del", "dev", device, "root"], check=False)
            run([*prefix, "tc", "qdisc", "del", "dev", device, "clsact"], check=False)


class TestNetwork:
    """The bridge and `count` hosts; `close()` removes every sfs-* namespace and link."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, count: int) -> None:
        self.hosts = [Host(i) for i in range(1, count + 1)]

    @staticmethod
    def check() -> None:
        """Raise NetworkUnavailable saying what is missing."""
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise NetworkUnavailable("iproute2 (ip, tc) is not installed")
        probe = f"{PREFIX}probe"
        made = run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            raise NetworkUnavailable(f"cannot create a network namespace: {made.stderr.strip()}")
        run(["ip", "netns", "del", probe], check=False)

    def open(self) -> None:
        self.close()  # leftovers of an interrupted session
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{GATEWAY}/{PREFIX_LEN}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for host in self.hosts:
            ns = host.namespace
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", host.outside, "type", "veth", "peer", "eth0", "netns", ns])
            run(["ip", "link", "set", host.outside, "master", BRIDGE, "up"])
            inside = host.command
            run(inside(["ip", "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"]))
            run(inside(["ip", "link", "set", "eth0", "up"]))
            run(inside(["ip", "link", "set", "lo", "up"]))

    def close(self) -> None:
        namespaces = run(["ip", "-o", "netns", "list"], check=False).stdout.split("\n")
        for line in namespaces:
            name = line.split(" ", 1)[0]
            if name.startswith(PREFIX):
                run(["ip", "netns", "del", name], check=False)
        links = run(["ip", "-o", "link", "show"], check=False).stdout.splitlines()
        for line in links:
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(PREFIX):
                run(["ip", "link", "del", name], check=False)


def _loss_object(one_in: int, workdir: Path) -> Path:
    """Compile the random-drop classifier for `one_in` (llc, from Debian's llvm)."""
    if shutil.which("llc") is None:
        raise NetworkUnavailable("llc (Debian package llvm) is needed to build the loss filter")
    source = workdir / f"loss-{one_in}.ll"
    target = source.with_suffix(".o")
    source.write_text(_LOSS_IR.format(n=one_in))
    run(["llc", "-march=bpf", "-filetype=obj", str(source), "-o", str(target)])
    return target
