"""Benchmark: the broker path alone — confirmed publishing and consume + ack — against bare pika.

1. publish: the scheduler publishing N sync.commands with publisher confirms (batches of 1000,
   asynchronous confirms) against pika publishing the same bodies without confirms;
2. consume: the worker's runner (decode, a no-op handler, ack after its outputs are confirmed)
   draining N queued commands with `--concurrency` threads, against a bare pika consumer
   (BlockingConnection, the same prefetch, ack per message) draining the same messages.
Each measurement uses a fresh topology prefix on the local broker, deleted afterwards.
Each round measures ours and its baseline back to back; the table gives medians of --repeat
rounds (and their range), the ratios per round.
Usage: python bench/broker_path.py [--messages 100000] [--concurrency 16] [--repeat 3]
       [--amqp-url URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pika
from common import delete_topology

from adapters.amqp import AmqpBroker
from adapters.broker import Outgoing
from adapters.topology import Topology
from consumers.runner import MessageRunner, Outcome, QueueConsumer, default_headroom
from domain.errors import SfsyncError
from domain.messages import Envelope, SyncCommand
from domain.records import Customer
from producers.scheduler import Scheduler
from sfsync.bootstrap import default_stamper


class Listed:
    """A Services Manager port that only lists `n` customers."""

    def __init__(self, n: int) -> None:
        self.ids = [f"cust-{i:06d}" for i in range(n)]

    def list_customers(self) -> Any:
        return (Customer(id=i, sharefile_enabled=True, subdomain=i) for i in self.ids)


class NoOp:
    """A handler that does nothing: what is left is the broker path and the runner."""

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        return []

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        return []


def fresh_topology() -> Topology:
    return Topology(prefix=f"sfsync-bench-{uuid.uuid4().hex[:6]}")


def bodies(n: int) -> list[bytes]:
    stamp = default_stamper()
    return [
        stamp(SyncCommand(customer_id=i, run_id="bench"), correlation_id="bench").to_json()
        for i in Listed(n).ids
    ]


def scheduler_publish(amqp_url: str, n: int) -> float:
    topology = fresh_topology()
    broker = AmqpBroker([amqp_url], topology, name="bench-scheduler")
    broker.start()
    try:
        scheduler = Scheduler(
            sm=Listed(n),  # type: ignore[arg-type]
            broker=broker,
            stamp=default_stamper(),
            new_run_id=lambda: "bench",
        )
        started = time.perf_counter()
        scheduler.run_once()
        return n / (time.perf_counter() - started)
    finally:
        broker.close()
        delete_topology(amqp_url, topology)


def bare_publish(amqp_url: str, payloads: list[bytes]) -> float:
    topology = fresh_topology()
    declaring = AmqpBroker([amqp_url], topology, name="bench-declare")
    declaring.start()  # declare the topology, as every role does, then let go
    declaring.close()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        started = time.perf_counter()
        for body in payloads:
            channel.basic_publish(topology.exchange, "sync.command", body, properties)
        connection.process_data_events(0)
        return len(payloads) / (time.perf_counter() - started)
    finally:
        connection.close()
        delete_topology(amqp_url, topology)


def fill(amqp_url: str, topology: Topology, payloads: list[bytes]) -> None:
    broker = AmqpBroker([amqp_url], topology, name="bench-fill")
    broker.start()
    try:
        for start in range(0, len(payloads), 1000):
            broker.publish(
                [
                    Outgoing("sync.command", body, str(start + i), "bench", "sync.command")
                    for i, body in enumerate(payloads[start : start + 1000])
                ]
            )
    finally:
        broker.close()


def runner_consume(amqp_url: str, payloads: list[bytes], concurrency: int) -> float:
    topology = fresh_topology()
    fill(amqp_url, topology, payloads)
    broker = AmqpBroker([amqp_url], topology, name="bench-worker")
    broker.start()
    runner = MessageRunner(broker, topology, NoOp())
    consumer = QueueConsumer(broker, topology.queues()[0], runner, concurrency)
    try:
        started = time.perf_counter()
        consumer.start()
        while runner.counts[Outcome.ACKED] < len(payloads):
            time.sleep(0.01)  # polling the count of a running consumer: the measurement's clock
        return len(payloads) / (time.perf_counter() - started)
    finally:
        consumer.stop()
        broker.close()
        delete_topology(amqp_url, topology)


def bare_consume(amqp_url: str, payloads: list[bytes], prefetch: int) -> float:
    topology = fresh_topology()
    fill(amqp_url, topology, payloads)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    done = threading.Event()
    acked = [0]
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=prefetch)

        def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            acked[0] += 1
            if acked[0] == len(payloads):
                done.set()

        channel.basic_consume(topology.sync_queue, on_message)
        started = time.perf_counter()
        while not done.is_set():
            connection.process_data_events(time_limit=0.1)
        return len(payloads) / (time.perf_counter() - started)
    finally:
        connection.close()
        delete_topology(amqp_url, topology)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds, ours and the baseline alternating"
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    args = parser.parse_args()
    if args.messages < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--messages, --concurrency and --repeat must be at least 1")
    payloads = bodies(args.messages)
    # The runner's prefetch: its threads, plus the deliveries waiting for their confirms.
    prefetch = args.concurrency + default_headroom(args.concurrency)

    rates: dict[str, list[float]] = {"confirmed": [], "unconfirmed": [], "ours": [], "bare": []}
    for round_ in range(1, args.repeat + 1):
        # Each round measures ours and its baseline back to back: the machine's noise (other
        # tenants, RabbitMQ's own housekeeping) then hits both alike, and medians cut it further.
        print(f"round {round_}/{args.repeat}: publishing ...", file=sys.stderr)
        rates["confirmed"].append(scheduler_publish(args.amqp_url, args.messages))
        rates["unconfirmed"].append(bare_publish(args.amqp_url, payloads))
        print(f"round {round_}/{args.repeat}: consuming ...", file=sys.stderr)
        rates["ours"].append(runner_consume(args.amqp_url, payloads, args.concurrency))
        rates["bare"].append(bare_consume(args.amqp_url, payloads, prefetch))

    def rate(name: str) -> str:
        values = rates[name]
        spread = f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else ""
        return f"{statistics.median(values):,.0f} msg/s{spread}"

    def ratio(ours: str, baseline: str) -> str:
        per_round = [a / b for a, b in zip(rates[ours], rates[baseline], strict=True)]
        spread = f" ({min(per_round):.0%}-{max(per_round):.0%})" if len(per_round) > 1 else ""
        return f"{statistics.median(per_round):.0%}{spread}"

    rows = [
        ("scheduler publish with confirms", rate("confirmed")),
        ("baseline: pika publish, no confirms", rate("unconfirmed")),
        ("  scheduler / baseline (goal >= 50%)", ratio("confirmed", "unconfirmed")),
        (f"runner consume + ack, no-op handler, {args.concurrency} threads", rate("ours")),
        (f"baseline: bare pika consumer, prefetch {prefetch}", rate("bare")),
        ("  runner / baseline (goal >= 50%)", ratio("ours", "bare")),
    ]
    print(
        f"\nbroker path, {args.messages:,} sync.command messages, local RabbitMQ; "
        f"median of {args.repeat} round(s) (range), ratios per round"
    )
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value:>30}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
