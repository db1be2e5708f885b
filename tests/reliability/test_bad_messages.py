"""Malformed messages on the work queues are parked with a reason; real work goes on around them."""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tenacity import Retrying, stop_after_delay, wait_fixed

from adapters.amqp import AmqpBroker
from adapters.broker import Outgoing, published_now
from adapters.topology import (
    FROM_QUEUE_HEADER,
    REASON_HEADER,
    QueueSpec,
    Topology,
)
from consumers.runner import MessageRunner, Outcome
from consumers.submitter import SubmitHandler
from consumers.sync_worker import SyncHandler
from domain.errors import InvalidMessage, PermanentError
from domain.messages import (
    ProvisioningItem,
    ProvisioningRequested,
    SyncCommand,
    SyncCompleted,
    decode,
)
from domain.plan import Action, Rule
from domain.policy import Policy
from domain.report import Outcome as ReportOutcome
from sfsync.bootstrap import build_topology, default_stamper, running, track_run
from sfsync.settings import Settings
from simulators import Scenario, SimulatorServers, generate_fleet
from tests.e2e.conftest import no_stray_settings, settings_for  # noqa: F401
from tests.fakes import FakeServicesManager, FakeShareFile, RecordedDelivery, fixed_stamper

STAMP = fixed_stamper()
SYNC_KEY = "sync.command"
PROVISIONING_KEY = "provisioning.requested"
BAD_BODIES = 10_000
FLOOD_SEED = 20261127
INVALID = "invalid message:"


# -- valid templates the generator breaks ------------------------------------------------------


# Message ids of the generated bodies; reseeded by bad_bodies so that a seed gives the same bodies.
_IDS = random.Random(0)


def _envelope(message_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "message_id": str(uuid.UUID(int=_IDS.getrandbits(128))),
        "type": message_type,
        "schema_version": 1,
        "occurred_at": "2026-11-27T12:00:00+00:00",
        "correlation_id": "run-bad",
        "payload": payload,
    }


def _command(customer_id: str = "cust-0001") -> dict[str, Any]:
    return _envelope(SYNC_KEY, {"customer_id": customer_id, "run_id": "run-bad"})


def _item(user_id: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "action": "provision",
        "email": f"{user_id}@x.example",
        "rule": "employee_without_service",
    }


def _request(customer_id: str = "cust-0001", items: int = 2) -> dict[str, Any]:
    return _envelope(
        PROVISIONING_KEY,
        {
            "customer_id": customer_id,
            "run_id": "run-bad",
            "request_id": "req-bad",
            "part": 1,
            "parts": 1,
            "items": [_item(f"u-{n}") for n in range(items)],
        },
    )


def _template(rng: random.Random) -> dict[str, Any]:
    return _command() if rng.random() < 0.5 else _request()


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()


# -- one function per kind of damage ------------------------------------------------------------

BAD_CUSTOMER_IDS = ("../x", "", "a" * 300, "ünïcödé", "a/b", " a", "a\n", "-a", "\udc80", "a b", 7)


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 300))


def invalid_utf8(rng: random.Random) -> bytes:
    broken = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    text = json.dumps(_template(rng))
    cut = rng.randint(1, len(text) - 1)
    return text[:cut].encode() + broken + text[cut:].encode()


def utf16_envelope(rng: random.Random) -> bytes:
    return json.dumps(_template(rng)).encode(rng.choice(["utf-16", "utf-32"]))


def not_an_object(rng: random.Random) -> bytes:
    value: object = rng.choice(
        [[], [_command()], 0, 42, -1.5, 1e308, None, "sync.command", "", True, False, [[[]]]]
    )
    return _dumps(value)


def not_json(rng: random.Random) -> bytes:
    text = json.dumps(_template(rng))
    return rng.choice(
        [
            text[: rng.randint(0, len(text) - 1)],  # cut off
            text + rng.choice(["}", "x", ",", " []"]),  # trailing garbage
            text.replace('"', "'"),  # Python-ish, not JSON
            text.replace(":", "=", 1),
            "",
            " ",
            "\ufeff",
            "{" * rng.randint(1, 50),
        ]
    ).encode()


def unknown_type(rng: random.Random) -> bytes:
    message = _template(rng)
    if rng.random() < 0.15:
        del message["type"]
    else:
        message["type"] = rng.choice(
            [
                "sync.commands",
                "SYNC.COMMAND",
                "",
                "sync",
                "sync.*",
                "provisioning.requested ",
                "\udc80",
                None,
                5,
                ["sync.command"],
                {"name": "sync.command"},
            ]
        )
    return _dumps(message)


def wrong_schema_version(rng: random.Random) -> bytes:
    message = _template(rng)
    if rng.random() < 0.15:
        del message["schema_version"]
    else:
        message["schema_version"] = rng.choice([0, 2, -1, "1", True, 1.0, None, [1], 10**30])
    return _dumps(message)


def missing_envelope_field(rng: random.Random) -> bytes:
    message = _template(rng)
    del message[rng.choice(["message_id", "occurred_at", "correlation_id", "payload"])]
    return _dumps(message)


def bad_envelope_field(rng: random.Random) -> bytes:
    message = _template(rng)
    name, value = rng.choice(
        [
            ("message_id", "not-a-uuid"),
            ("message_id", 12),
            ("occurred_at", "2026-11-27T12:00:00"),  # naive: no time zone
            ("occurred_at", "yesterday"),
            ("correlation_id", ""),
            ("correlation_id", "r" * 129),
            ("correlation_id", None),
            ("payload", []),
            ("payload", "customer_id=cust-0001"),
            ("priority", 9),  # an envelope field nobody defined
        ]
    )
    message[name] = value
    return _dumps(message)


def missing_payload_field(rng: random.Random) -> bytes:
    message = _template(rng)
    payload = message["payload"]
    del payload[rng.choice([k for k in payload if k not in ("part", "parts")])]
    return _dumps(message)


def bad_payload_field(rng: random.Random) -> bytes:
    message = _template(rng)
    payload = message["payload"]
    choices: list[tuple[str, object]]
    if message["type"] == SYNC_KEY:
        choices = [
            ("customer_id", rng.choice(BAD_CUSTOMER_IDS)),
            ("run_id", ""),
            ("run_id", 5),
            ("reason", "whenever"),
            ("dry_run", "maybe"),
            ("dry_run", 2),
            ("force", True),  # extra fields are refused
        ]
    else:
        choices = [
            ("customer_id", rng.choice(BAD_CUSTOMER_IDS)),
            ("request_id", ""),
            ("part", 0),
            ("parts", -1),
            ("items", []),
            ("items", [{**_item("u-1"), "action": "delete"}]),
            ("items", [{**_item("u-1"), "rule": "because"}]),
            ("items", [{**_item("u-1"), "user_id": ""}]),
            ("items", [_item("u-1"), _item("u-2"), _item("u-1")]),  # the same user twice
            ("items", "u-1,u-2"),
        ]
    name, value = rng.choice(choices)
    payload[name] = value
    return _dumps(message)


def deeply_nested(rng: random.Random) -> bytes:
    depth = rng.choice([100, 1_000, 5_000, 100_000])
    if rng.random() < 0.5:
        return ("[" * depth + "]" * depth).encode()
    message = _template(rng)
    message["payload"] = {"customer_id": "cust-0001", "run_id": "r"}
    text = json.dumps(message)
    nested = '{"a":' * depth + "1" + "}" * depth
    return text.replace('"run_id": "r"', f'"run_id": {nested}').encode()


CHEAP_DAMAGE: tuple[Callable[[random.Random], bytes], ...] = (
    random_bytes,
    invalid_utf8,
    utf16_envelope,
    not_an_object,
    not_json,
    unknown_type,
    wrong_schema_version,
    missing_envelope_field,
    bad_envelope_field,
    missing_payload_field,
    bad_payload_field,
)


def expensive_bodies(rng: random.Random) -> list[bytes]:
    """A few of each kind that costs megabytes or deep parser stacks."""
    huge = [
        _dumps({**_command(), "payload": {"customer_id": "a" * 2_000_000, "run_id": "r"}}),
        _dumps({**_command(), "payload": {"customer_id": "c", "run_id": "r" * 3_500_000}}),
        rng.randbytes(5_000_000),
    ]
    too_many = []
    for _ in range(3):
        request = _request(items=1001)
        too_many.append(_dumps(request))
    return huge + too_many + [deeply_nested(rng) for _ in range(6)]


def wrong_queue_bodies() -> list[tuple[str, bytes]]:
    """Valid messages on a queue that does not take their type (an event on the command queue)."""
    report = SyncCompleted(
        customer_id="cust-0001", run_id="run-bad", outcome=ReportOutcome.COMPLETED
    )
    request = ProvisioningRequested(
        customer_id="cust-0001",
        run_id="run-bad",
        request_id="req-wrong-queue",
        items=(
            ProvisioningItem(user_id="u-1", action=Action.PROVISION, rule=Rule.RETRY_AFTER_FAILURE),
        ),
    )
    command = SyncCommand(customer_id="cust-0001", run_id="run-bad")
    return [
        (SYNC_KEY, STAMP(report, correlation_id="run-bad").to_json()),
        (SYNC_KEY, STAMP(request, correlation_id="run-bad").to_json()),
        (PROVISIONING_KEY, STAMP(command, correlation_id="run-bad").to_json()),
        (PROVISIONING_KEY, STAMP(report, correlation_id="run-bad").to_json()),
    ]


def bad_bodies(count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` (routing key, body) pairs, every one refused by `decode`; the same for a seed."""
    rng = random.Random(seed)
    _IDS.seed(seed)
    bodies = [(rng.choice([SYNC_KEY, PROVISIONING_KEY]), b) for b in expensive_bodies(rng)]
    while len(bodies) < count:
        damage = CHEAP_DAMAGE[len(bodies) % len(CHEAP_DAMAGE)]
        body = damage(rng)
        key = _routing_key_for(body, rng)
        bodies.append((key, body))
    rng.shuffle(bodies)
    return bodies


def _routing_key_for(body: bytes, rng: random.Random) -> str:
    # Mostly the queue the body claims to be for, sometimes the other one.
    claims_request = b'"provisioning.requested"' in body[:400]
    home = PROVISIONING_KEY if claims_request else SYNC_KEY
    other = SYNC_KEY if claims_request else PROVISIONING_KEY
    return home if rng.random() < 0.8 else other


# Valid messages on the wrong queue, among the flood: parked too, but not by the decoder.
WRONG_QUEUE_COPIES = 5


def flood(seed: int) -> tuple[list[tuple[str, bytes]], set[bytes]]:
    """BAD_BODIES (routing key, body) pairs, and which of them are well-formed but misrouted."""
    wrong = wrong_queue_bodies() * WRONG_QUEUE_COPIES
    bodies = bad_bodies(BAD_BODIES - len(wrong), seed) + wrong
    random.Random(seed).shuffle(bodies)
    return bodies, {body for _, body in wrong}


def test_the_flood_is_ten_thousand_bodies_the_decoder_refuses_but_the_misrouted_ones() -> None:
    """The flood's oracle rests on this: every generated body is an invalid message."""
    bodies, misrouted = flood(FLOOD_SEED)
    assert len(bodies) == BAD_BODIES
    accepted = []
    for _, body in bodies:
        try:
            decode(body)
        except InvalidMessage:
            continue
        accepted.append(body[:200])
    assert len(accepted) == len(misrouted) * WRONG_QUEUE_COPIES
    assert {body for body in accepted} <= {body[:200] for body in misrouted}
    keys = Counter(key for key, _ in bodies)
    assert keys[SYNC_KEY] > 3000 and keys[PROVISIONING_KEY] > 3000


# -- the runner on its own, no broker: arbitrary bytes and arbitrary JSON ------------------------


class RecordingBroker:
    """Confirms every publish at once and remembers it."""

    def __init__(self) -> None:
        self.published: list[Outgoing] = []

    def start(self) -> None: ...

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.published.extend(messages)

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        return published_now(self.publish, messages)

    def consume(self, queue: QueueSpec, on_delivery: Callable[..., None], prefetch: int) -> None:
        raise NotImplementedError

    def cancel(self, queue: str) -> None: ...

    def close(self) -> None: ...


UNIT_TOPOLOGY = Topology(prefix="t")
WORK_QUEUES = (UNIT_TOPOLOGY.sync_queue, UNIT_TOPOLOGY.provisioning_queue)


@dataclass
class UnitRig:
    """The real handler of one work queue over fakes, behind the real runner."""

    runner: MessageRunner
    broker: RecordingBroker
    sm: FakeServicesManager


def rig(queue: str) -> UnitRig:
    sm = FakeServicesManager()
    sm.add_customer("cust-0001")  # exists, with no users
    broker = RecordingBroker()
    handler: SyncHandler | SubmitHandler
    if queue == UNIT_TOPOLOGY.sync_queue:
        handler = SyncHandler(sm=sm, sharefile=FakeShareFile(), policy=Policy(), stamp=STAMP)
    else:
        handler = SubmitHandler(sm=sm, stamp=STAMP)
    return UnitRig(MessageRunner(broker, UNIT_TOPOLOGY, handler), broker, sm)


def queue_for(key: str) -> str:
    return UNIT_TOPOLOGY.sync_queue if key == SYNC_KEY else UNIT_TOPOLOGY.provisioning_queue


def assert_parked_as_invalid(queue: str, body: bytes) -> None:
    unit = rig(queue)
    delivery = RecordedDelivery(body=body, queue=queue, routing_key="k")
    outcome = unit.runner.process(delivery).result(timeout=5)
    assert outcome is Outcome.PARKED
    assert delivery.settled == ["ack"]
    [parked] = unit.broker.published
    assert parked.routing_key == f"{queue}.dead" and parked.exchange == ""
    assert parked.body == body
    reason = parked.headers[REASON_HEADER]
    assert reason.startswith(INVALID) and len(reason) > len(INVALID) + 5
    # What RabbitMQ needs: the parked copy's properties must encode (UTF-8 header values).
    pika.BasicProperties(
        message_id=parked.message_id,
        correlation_id=parked.correlation_id,
        type=parked.type,
        headers=dict(parked.headers),
    ).encode()


# Lone surrogates, NUL, bidi overrides: strings a header or a log line may choke on.
HOSTILE_TEXT = ("\udc80", "sync.command\ud800", "\x00", "\u202eevil", "é" * 70, "../x", "a" * 300)
any_text = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(
    HOSTILE_TEXT
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)


@st.composite
def almost_messages(draw: st.DrawFn) -> bytes:
    """Envelope-shaped JSON whose every field may be missing, mistyped or hostile."""
    message: dict[str, Any] = draw(st.dictionaries(any_text, json_values, max_size=3))
    fields = {
        "message_id": st.uuids().map(str) | json_values,
        "type": st.sampled_from([SYNC_KEY, PROVISIONING_KEY, "sync.requested", *HOSTILE_TEXT])
        | json_values,
        "schema_version": st.sampled_from([1, 0, 2, "1", True, 1.0]) | json_values,
        "occurred_at": st.sampled_from(["2026-11-27T12:00:00Z", "2026-11-27"]) | json_values,
        "correlation_id": any_text | json_values,
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "customer_id": st.sampled_from(BAD_CUSTOMER_IDS) | any_text | json_values,
                "run_id": any_text | json_values,
                "request_id": any_text,
                "items": st.lists(json_values, max_size=3),
                "dry_run": json_values,
                "source": any_text,
            },
        )
        | json_values,
    }
    for name, strategy in fields.items():
        if draw(st.booleans()) or name in ("type", "schema_version"):
            message[name] = draw(strategy)
    text = json.dumps(message, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(body=st.binary(max_size=500), queue=st.sampled_from(WORK_QUEUES))
def test_arbitrary_bytes_are_parked_as_invalid_and_never_raise(body: bytes, queue: str) -> None:
    assert_parked_as_invalid(queue, body)


@settings(
    max_examples=600,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(body=almost_messages(), queue=st.sampled_from(WORK_QUEUES))
def test_arbitrary_json_is_parked_as_invalid_or_handled_and_never_raises(
    body: bytes, queue: str
) -> None:
    try:
        decode(body)
    except InvalidMessage:
        assert_parked_as_invalid(queue, body)
        return
    # A body that happens to be a valid message is handled (or parked) like any other.
    delivery = RecordedDelivery(body=body, queue=queue, routing_key="k")
    assert rig(queue).runner.process(delivery).result(timeout=5) in (
        Outcome.ACKED,
        Outcome.PARKED,
    )


@pytest.mark.parametrize("which", range(4), ids=["event", "request", "command", "event2"])
def test_a_valid_message_on_a_queue_that_does_not_take_its_type_is_parked_as_invalid(
    which: int,
) -> None:
    key, body = wrong_queue_bodies()[which]
    assert_parked_as_invalid(queue_for(key), body)


def test_a_valid_message_on_a_queue_that_does_not_take_its_type_is_parked_without_effect() -> None:
    for key, body in wrong_queue_bodies():
        queue = queue_for(key)
        unit = rig(queue)
        delivery = RecordedDelivery(body=body, queue=queue, routing_key=key)
        assert unit.runner.process(delivery).result(timeout=5) is Outcome.PARKED
        # Parked only: no report, no provisioning answer, nothing submitted.
        assert [p.routing_key for p in unit.broker.published] == [f"{queue}.dead"]
        assert unit.broker.published[0].headers[REASON_HEADER]
        assert unit.sm.submitted == []


# -- the flood through RabbitMQ ---------------------------------------------------------------


@pytest.fixture
def small_fleet() -> Scenario:
    return generate_fleet(10, median_users=8, max_users=40, drift=0.1, seed=5)


@pytest.fixture
def fleet_servers(small_fleet: Scenario) -> Iterator[SimulatorServers]:
    with SimulatorServers(small_fleet, sharefile_page_size=50) as sims:
        yield sims


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def drain(amqp_url: str, queue: str, expected: int) -> list[tuple[bytes, dict[str, Any]]]:
    """Take every message out of `queue` (acked one by one, prefetch 500) and return them."""
    found: list[tuple[bytes, dict[str, Any]]] = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=500)
        for method, properties, body in channel.consume(queue, inactivity_timeout=5):
            if method is None:  # nothing more arrived within the inactivity timeout
                break
            found.append((body, dict(properties.headers or {})))
            channel.basic_ack(method.delivery_tag)
            if len(found) >= expected:
                break
        channel.cancel()  # requeues whatever was delivered but not taken
        # And nothing is left behind: basic_get says the queue is empty.
        method, _, _ = channel.basic_get(queue, auto_ack=False)
        assert method is None, f"{queue} still holds messages"
    finally:
        connection.close()
    return found


def commands_for(customer_ids: Sequence[str], run_id: str) -> list[Outgoing]:
    stamp = default_stamper()
    return [
        Outgoing.of(
            stamp(SyncCommand(customer_id=c, run_id=run_id, reason="manual"), correlation_id=run_id)
        )
        for c in customer_ids
    ]


def raw(key: str, body: bytes, number: int) -> Outgoing:
    return Outgoing(
        routing_key=key,
        body=body,
        message_id=f"bad-{number}",
        correlation_id="",
        type="",
        exchange=None,
    )


@pytest.mark.broker
@pytest.mark.slow
def test_ten_thousand_bad_messages_are_parked_with_reasons_while_the_fleet_syncs(
    fleet_servers: SimulatorServers,
    small_fleet: Scenario,
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
) -> None:
    sims = fleet_servers
    settings: Settings = settings_for(
        sims,
        tmp_path,
        SFSYNC_BROKER_URL=amqp_url,
        SFSYNC_PREFIX=topology.prefix,
        SFSYNC_CONCURRENCY="8",
    )
    names = build_topology(settings)
    bad, _misrouted = flood(FLOOD_SEED)
    expected_parked = Counter(key for key, _ in bad)
    customers = [c.id for c in small_fleet.customers if c.sharefile_enabled]
    run_id = f"run-flood-{uuid.uuid4().hex[:8]}"
    outgoing = [raw(key, body, n) for n, (key, body) in enumerate(bad)]
    # The valid commands are spread evenly through the flood.
    step = len(outgoing) // (len(customers) + 1)
    for position, command in enumerate(commands_for(customers, run_id), start=1):
        outgoing.insert(position * step + position - 1, command)

    publisher = AmqpBroker([amqp_url], names, name="flood-publisher")
    started = time.monotonic()
    with running(settings, worker=True, submitter=True) as roles:
        tracker, listener = track_run(roles, settings, run_id)
        assert not listener.runner.can_park  # a listener's queue has no parking queue
        tracker.expect(customers)
        publisher.start()
        try:
            for start in range(0, len(outgoing), 500):
                publisher.publish(outgoing[start : start + 500])
        finally:
            publisher.close()
        published_s = time.monotonic() - started

        sync_dead = names.dead_queue(names.sync_queue)
        provisioning_dead = names.dead_queue(names.provisioning_queue)
        for attempt in Retrying(stop=stop_after_delay(90), wait=wait_fixed(0.25), reraise=True):
            with attempt:
                assert queue_depth(amqp_url, sync_dead) >= expected_parked[SYNC_KEY]
                assert queue_depth(amqp_url, provisioning_dead) >= expected_parked[PROVISIONING_KEY]
        assert tracker.wait(60), tracker.progress()
        listener.stop()
        parked_s = time.monotonic() - started

        # The consumers survived the flood: one more command is handled as usual.
        final_run = f"run-after-{uuid.uuid4().hex[:8]}"
        final, final_listener = track_run(roles, settings, final_run)
        final.expect(customers[:1])
        roles.broker.publish(commands_for(customers[:1], final_run))
        assert final.wait(30), final.progress()
        final_listener.stop()
        counts = {c.queue.name: dict(c.runner.counts) for c in roles.consumers}

    print(f"\nflood: published in {published_s:.1f}s, parked and synced in {parked_s:.1f}s")
    result = tracker.result
    assert sorted(result.reports) == sorted(customers)
    assert result.failed == [] and result.failed_requests == []
    assert final.result.reports[customers[0]].outcome is ReportOutcome.COMPLETED
    assert sims.sm_states() == small_fleet.expected
    assert sims.duplicate_effective_submissions() == 0

    assert counts[names.sync_queue].get(Outcome.PARKED) == expected_parked[SYNC_KEY]
    assert counts[names.provisioning_queue].get(Outcome.PARKED) == expected_parked[PROVISIONING_KEY]
    for queue, key in ((names.sync_queue, SYNC_KEY), (names.provisioning_queue, PROVISIONING_KEY)):
        messages = drain(amqp_url, names.dead_queue(queue), expected_parked[key])
        assert len(messages) == expected_parked[key]
        assert Counter(body for body, _ in messages) == Counter(b for k, b in bad if k == key)
        reasons = [(body, headers.get(REASON_HEADER)) for body, headers in messages]
        assert all(isinstance(r, str) and len(r) > len(INVALID) + 5 for _, r in reasons)
        # Misrouted valid messages are invalid on that queue, and parked as such.
        not_invalid = [(b[:80], r) for b, r in reasons if not str(r).startswith(INVALID)]
        assert not_invalid == []
        assert {headers.get(FROM_QUEUE_HEADER) for _, headers in messages} == {queue}


@pytest.mark.broker
def test_a_message_whose_header_cannot_be_encoded_fails_alone_and_the_broker_goes_on(
    amqp_url: str, topology: Topology
) -> None:
    broker = AmqpBroker([amqp_url], topology, name="bad-header")
    broker.start()
    dead = topology.dead_queue(topology.sync_queue)
    try:
        with pytest.raises(PermanentError, match="could not be encoded"):
            broker.publish(
                [Outgoing(dead, b"x", "m1", "", "", {REASON_HEADER: "bad \udc80"}, exchange="")],
                timeout_s=2,
            )
        broker.publish([Outgoing(dead, b"y", "m2", "", "", exchange="")], timeout_s=2)
    finally:
        broker.close()
        # A dead I/O thread leaves its socket open: let it be collected (and warned about)
        # within this test, not during a later one.
        del broker
        gc.collect()
    assert queue_depth(amqp_url, dead) == 1


class WireTimestamp(int):
    """A field-table timestamp ('T') holding any 64-bit value, as other clients write them."""


@pytest.fixture
def wire_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process publish WireTimestamp headers (pika itself writes only datetimes)."""
    encode_value = pika.data.encode_value

    def encode(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, WireTimestamp):
            pieces.append(struct.pack(">cQ", b"T", int(value)))
            return 9
        return int(encode_value(pieces, value))

    monkeypatch.setattr(pika.data, "encode_value", encode)


# A millisecond epoch; 1969-07-20 as the RabbitMQ Java client writes it (a signed long).
every_wire_timestamp = pytest.mark.parametrize(
    "timestamp", [1_772_000_000_000, 2**64 - 14_256_000], ids=["milliseconds", "java-before-1970"]
)


def connection_losses(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "RabbitMQ connection" in r.getMessage()]


@pytest.mark.broker
@every_wire_timestamp
def test_a_command_with_a_timestamp_header_python_cannot_represent_is_synced_at_once(
    fleet_servers: SimulatorServers,
    small_fleet: Scenario,
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
    wire_timestamps: None,
    caplog: pytest.LogCaptureFixture,
    timestamp: int,
) -> None:
    """pika 1.4.4 turns such a header into a lost connection, so the message came back after
    every reconnect until its delivery limit parked it: one header from another system stopped
    that customer's syncs and dropped every other message in flight with it."""
    settings = settings_for(
        fleet_servers, tmp_path, SFSYNC_BROKER_URL=amqp_url, SFSYNC_PREFIX=topology.prefix
    )
    customer = next(c.id for c in small_fleet.customers if c.sharefile_enabled)
    run_id = f"run-ts-{uuid.uuid4().hex[:8]}"
    (command,) = commands_for([customer], run_id)
    sent_at = {"x-sent-at": WireTimestamp(timestamp)}
    with running(settings, worker=True, submitter=True) as roles:
        tracker, listener = track_run(roles, settings, run_id)
        tracker.expect([customer])
        roles.broker.publish([dataclasses.replace(command, headers=sent_at)])
        assert tracker.wait(20), tracker.progress()
        listener.stop()
    assert tracker.result.reports[customer].outcome is ReportOutcome.COMPLETED
    assert connection_losses(caplog) == []


@pytest.mark.broker
@every_wire_timestamp
def test_a_command_with_such_a_header_is_parked_with_it_and_the_worker_goes_on(
    fleet_servers: SimulatorServers,
    small_fleet: Scenario,
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
    wire_timestamps: None,
    caplog: pytest.LogCaptureFixture,
    timestamp: int,
) -> None:
    """The parking copy carries the message's headers: a value decoded so that pika could not
    encode it again (an int of 2**63 or more) ended the worker's I/O thread for good."""
    settings = settings_for(
        fleet_servers, tmp_path, SFSYNC_BROKER_URL=amqp_url, SFSYNC_PREFIX=topology.prefix
    )
    names = build_topology(settings)
    customer = next(c.id for c in small_fleet.customers if c.sharefile_enabled)
    run_id = f"run-ts-{uuid.uuid4().hex[:8]}"
    # A customer Services Manager does not know: a permanent failure, reported, then parked.
    unknown, known = commands_for(["cust-unknown", customer], run_id)
    sent_at = {"x-sent-at": WireTimestamp(timestamp)}
    with running(settings, worker=True, submitter=True) as roles:
        tracker, listener = track_run(roles, settings, run_id)
        tracker.expect(["cust-unknown", customer])
        roles.broker.publish([dataclasses.replace(unknown, headers=sent_at)])
        for attempt in Retrying(stop=stop_after_delay(20), wait=wait_fixed(0.1), reraise=True):
            with attempt:
                assert queue_depth(amqp_url, names.dead_queue(names.sync_queue)) == 1
        roles.broker.publish([known])  # the worker's connection still works
        assert tracker.wait(20), tracker.progress()
        listener.stop()
    assert [r.customer_id for r in tracker.result.failed] == ["cust-unknown"]
    assert tracker.result.reports[customer].outcome is ReportOutcome.COMPLETED
    [(_, headers)] = drain(amqp_url, names.dead_queue(names.sync_queue), 1)
    assert headers["x-sent-at"] == (timestamp if timestamp < 2**63 else timestamp - 2**64)
    assert connection_losses(caplog) == []


def die_holding(amqp_url: str, queue: str) -> int:
    """Take one message from `queue` as a worker that dies before acking it; its delivery count."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for attempt in Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.05), reraise=True):
            with attempt:
                method, properties, _ = channel.basic_get(queue, auto_ack=False)
                assert method is not None
        return int((properties.headers or {}).get("x-delivery-count", 0))
    finally:
        connection.close()  # unacked: RabbitMQ takes the message back


@pytest.mark.broker
def test_a_command_whose_every_handling_dies_is_reported_failed_and_parked_on_its_last_delivery(
    fleet_servers: SimulatorServers,
    small_fleet: Scenario,
    tmp_path: Path,
    amqp_url: str,
    topology: Topology,
) -> None:
    """Left to the queue's delivery limit, it was parked without a reason and without a report,
    so `sfsync sync` waited for it until its timeout."""
    limit = 3
    settings = settings_for(
        fleet_servers,
        tmp_path,
        SFSYNC_BROKER_URL=amqp_url,
        SFSYNC_PREFIX=topology.prefix,
        SFSYNC_DELIVERY_LIMIT=str(limit),
    )
    names = build_topology(settings)
    customer = next(c.id for c in small_fleet.customers if c.sharefile_enabled)
    run_id = f"run-dies-{uuid.uuid4().hex[:8]}"
    with running(settings) as roles:  # the topology and a listener, no worker yet
        tracker, listener = track_run(roles, settings, run_id)
        tracker.expect([customer])
        roles.broker.publish(commands_for([customer], run_id))
        counts = [die_holding(amqp_url, names.sync_queue) for _ in range(limit)]
        assert counts == list(range(limit))  # RabbitMQ counts each worker that died holding it
        with running(settings, worker=True) as workers:
            assert tracker.wait(20), tracker.progress()
            runner = workers.consumers[0].runner
            for attempt in Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.05), reraise=True):
                with attempt:  # parked once its report is confirmed
                    assert dict(runner.counts) == {Outcome.PARKED: 1}
        listener.stop()
    [report] = tracker.result.failed
    assert f"its {limit} earlier deliveries all ended without an ack" in str(report.error)
    [(_, headers)] = drain(amqp_url, names.dead_queue(names.sync_queue), 1)
    assert str(headers[REASON_HEADER]).startswith(f"delivery limit: its {limit} earlier")
    assert fleet_servers.submissions() == []
