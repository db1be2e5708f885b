"""Messages: the envelope round trip, the decoder's refusals, and the bulk requests of a plan."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from domain.errors import InvalidMessage, PermanentError
from domain.messages import (
    MAX_ITEMS_PER_REQUEST,
    PAYLOAD_TYPES,
    REPORT_TYPES,
    SCHEMA_VERSION,
    Payload,
    ProvisioningCompleted,
    ProvisioningFailed,
    ProvisioningItem,
    ProvisioningRequested,
    SyncCommand,
    SyncCompleted,
    SyncFailed,
    SyncHeld,
    SyncRequested,
    decode,
    envelope,
    provisioning_requests,
    report_payload,
    request_id_for,
)
from domain.plan import Action, Plan, Rule
from domain.policy import HoldCode, HoldReason, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import ItemResult, SharefileState, SharefileUser, SmUser
from domain.report import Outcome, SyncReport

MESSAGE_ID = UUID("6f1c1b3e-5d2a-4c3b-9a8e-0123456789ab")
OCCURRED_AT = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)

ITEM = ProvisioningItem(
    user_id="u-1",
    action=Action.PROVISION,
    email="ann@acme.example",
    rule=Rule.EMPLOYEE_WITHOUT_SERVICE,
)

REPORT = SyncReport.from_plan(
    reconcile(
        [SmUser(id="u-1", state=SharefileState.NOT_PROVISIONED, email="ann@acme.example")],
        [SharefileUser(id="sf-1", email="ann@acme.example"), SharefileUser(id="sf-2", email=None)],
        customer_id="cust-1",
    ),
    customer_id="cust-1",
    run_id="run-1",
    dry_run=False,
    request_ids=("req-1",),
)

SAMPLES: dict[str, Payload] = {
    "sync.command": SyncCommand(
        customer_id="cust-1",
        run_id="run-1",
        reason="manual",
        dry_run=True,
        approved_plan_id="plan-1",
    ),
    "sync.requested": SyncRequested(customer_id="cust-1", source="crm", reason="new hire"),
    "provisioning.requested": ProvisioningRequested(
        customer_id="cust-1", run_id="run-1", request_id="req-1", part=1, parts=2, items=(ITEM,)
    ),
    "sync.completed": SyncCompleted.model_validate(REPORT.model_dump()),
    "sync.held": SyncHeld.model_validate(
        REPORT.model_copy(
            update={
                "outcome": Outcome.HELD,
                "hold_reasons": (HoldReason(code=HoldCode.SOURCE_EMPTY, message="empty"),),
            }
        ).model_dump()
    ),
    "sync.failed": SyncFailed.model_validate(
        SyncReport.failure(
            customer_id="cust-1", run_id="run-1", dry_run=False, error="boom"
        ).model_dump()
    ),
    "provisioning.completed": ProvisioningCompleted(
        customer_id="cust-1",
        run_id="run-1",
        request_id="req-1",
        items=(
            ItemResult(user_id="u-1", action="provision", status="accepted"),
            ItemResult(
                user_id="u-2",
                action="deprovision",
                status="rejected",
                error_code="already_in_state",
                error_message="already not provisioned",
            ),
        ),
        replayed=True,
    ),
    "provisioning.failed": ProvisioningFailed(
        customer_id="cust-1", run_id="run-1", request_id="req-1", error="HTTP 400", items=(ITEM,)
    ),
}


def wire(payload: Payload) -> dict[str, Any]:
    env = envelope(payload, message_id=MESSAGE_ID, occurred_at=OCCURRED_AT, correlation_id="run-1")
    result: dict[str, Any] = json.loads(env.to_json())
    return result


def body(raw: object) -> bytes:
    return json.dumps(raw).encode()


def command() -> dict[str, Any]:
    return wire(SAMPLES["sync.command"])


def test_there_is_a_sample_for_every_message_type() -> None:
    assert set(SAMPLES) == set(PAYLOAD_TYPES)
    for message_type, payload in SAMPLES.items():
        assert type(payload) is PAYLOAD_TYPES[message_type]


@pytest.mark.parametrize("message_type", sorted(PAYLOAD_TYPES))
def test_every_message_type_survives_the_envelope_round_trip(message_type: str) -> None:
    payload = SAMPLES[message_type]
    sent = envelope(payload, message_id=MESSAGE_ID, occurred_at=OCCURRED_AT, correlation_id="run-1")

    received = decode(sent.to_json())

    assert received.type == message_type
    assert received.schema_version == SCHEMA_VERSION
    assert received.message_id == MESSAGE_ID
    assert received.occurred_at == OCCURRED_AT
    assert received.correlation_id == "run-1"
    assert type(received.payload) is type(payload)
    assert received.payload == payload
    assert received.to_json() == sent.to_json()


@pytest.mark.parametrize("message_type", sorted(PAYLOAD_TYPES))
def test_the_envelope_class_of_a_type_outlives_a_garbage_collection(message_type: str) -> None:
    # pydantic holds its Envelope[X] classes weakly: rebuilding one after every collection
    # cost a worker 9 % of its CPU.
    sent = envelope(
        SAMPLES[message_type], message_id=MESSAGE_ID, occurred_at=OCCURRED_AT, correlation_id="r"
    )
    sent_class = weakref.ref(type(sent))
    received_class = weakref.ref(type(decode(sent.to_json())))
    del sent
    gc.collect()
    assert sent_class() is not None and received_class() is sent_class()


def test_envelope_serialises_the_whole_payload() -> None:
    raw = wire(SAMPLES["provisioning.requested"])

    assert raw["type"] == "provisioning.requested"
    assert raw["payload"]["items"] == [
        {
            "user_id": "u-1",
            "action": "provision",
            "email": "ann@acme.example",
            "rule": "employee_without_service",
        }
    ]


def test_decode_accepts_text_as_well_as_bytes() -> None:
    assert decode(json.dumps(command())).payload == SAMPLES["sync.command"]


def test_sync_requested_ignores_unknown_fields() -> None:
    raw = wire(SAMPLES["sync.requested"])
    raw["payload"]["priority"] = "high"

    assert decode(body(raw)).payload == SAMPLES["sync.requested"]


def test_sync_requested_needs_only_customer_and_source() -> None:
    raw = wire(SAMPLES["sync.requested"])
    raw["payload"] = {"customer_id": "cust-1", "source": "crm"}

    payload = decode(body(raw)).payload
    assert isinstance(payload, SyncRequested)
    assert payload.reason is None


def with_payload(**changes: object) -> bytes:
    raw = command()
    raw["payload"].update(changes)
    return body(raw)


def without_payload_field(name: str) -> bytes:
    raw = command()
    del raw["payload"][name]
    return body(raw)


def with_envelope(**changes: object) -> bytes:
    raw = command()
    raw.update(changes)
    return body(raw)


def without_envelope_field(name: str) -> bytes:
    raw = command()
    del raw[name]
    return body(raw)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        pytest.param(b"not json", "not JSON", id="not-json"),
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b'{"type": "sync.command", "x": "\xff"}', "not UTF-8", id="invalid-utf8"),
        pytest.param(b"[1, 2]", "JSON list, not an object", id="array"),
        pytest.param(b"42", "JSON int, not an object", id="number"),
        pytest.param(b'"sync.command"', "JSON str, not an object", id="string"),
        pytest.param(b"null", "not an object", id="null"),
        pytest.param(b"[" * 100_000, "nested too deeply", id="deeply-nested"),
        pytest.param(
            with_envelope(type="sync.unknown"),
            "unknown message type 'sync.unknown'",
            id="unknown-type",
        ),
        pytest.param(with_envelope(type=7), "unknown message type 7", id="type-not-a-string"),
        pytest.param(without_envelope_field("type"), "no 'type' field", id="missing-type"),
        pytest.param(
            with_envelope(schema_version=2), "unsupported schema_version 2", id="version-2"
        ),
        pytest.param(
            with_envelope(schema_version="1"), "unsupported schema_version", id="version-str"
        ),
        pytest.param(
            with_envelope(schema_version=True), "unsupported schema_version", id="version-bool"
        ),
        pytest.param(
            with_envelope(schema_version=1.0), "unsupported schema_version", id="version-float"
        ),
        pytest.param(
            without_envelope_field("schema_version"), "unsupported schema_version", id="no-version"
        ),
        pytest.param(
            without_envelope_field("message_id"), "message_id: Field required", id="no-message-id"
        ),
        pytest.param(with_envelope(message_id="not-a-uuid"), "message_id", id="bad-message-id"),
        pytest.param(
            with_envelope(occurred_at="2026-11-20T10:00:00"), "occurred_at", id="naive-time"
        ),
        pytest.param(with_envelope(correlation_id=""), "correlation_id", id="empty-correlation"),
        pytest.param(with_envelope(payload=[]), "payload", id="payload-not-object"),
        pytest.param(
            with_envelope(extra=1), "extra: Extra inputs are not permitted", id="extra-envelope"
        ),
        pytest.param(
            without_payload_field("run_id"), "payload.run_id: Field required", id="missing-run-id"
        ),
        pytest.param(
            without_payload_field("customer_id"), "payload.customer_id", id="missing-customer"
        ),
        pytest.param(with_payload(run_id=5), "payload.run_id", id="run-id-not-string"),
        pytest.param(with_payload(dry_run=[1]), "payload.dry_run", id="dry-run-not-bool"),
        pytest.param(with_payload(reason="whim"), "payload.reason", id="unknown-reason"),
        pytest.param(with_payload(customer_id="../etc"), "payload.customer_id", id="path-customer"),
        pytest.param(with_payload(customer_id=""), "payload.customer_id", id="empty-customer"),
        pytest.param(
            with_payload(customer_id="c" * 200), "payload.customer_id", id="long-customer"
        ),
        pytest.param(with_payload(customer_id="a b"), "payload.customer_id", id="space-customer"),
        pytest.param(
            with_payload(priority="high"), "payload.priority: Extra inputs", id="extra-payload"
        ),
    ],
)
def test_decode_refuses_bad_bodies_with_a_clear_invalid_message(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(raw)

    assert says in str(caught.value)
    assert isinstance(caught.value, PermanentError)  # consumers park it, never retry it


def test_invalid_customer_id_is_refused_in_every_payload_that_names_one() -> None:
    for message_type in sorted(PAYLOAD_TYPES):
        raw = wire(SAMPLES[message_type])
        raw["payload"]["customer_id"] = "../etc"
        with pytest.raises(InvalidMessage, match="customer_id"):
            decode(body(raw))


@pytest.mark.parametrize("message_type", sorted(set(PAYLOAD_TYPES) - {"sync.requested"}))
def test_strict_payloads_refuse_extra_fields(message_type: str) -> None:
    raw = wire(SAMPLES[message_type])
    raw["payload"]["surprise"] = True

    with pytest.raises(InvalidMessage, match="surprise"):
        decode(body(raw))


def test_invalid_message_text_is_bounded() -> None:
    raw = command()
    raw["payload"] = {"customer_id": "x" * 5000, "run_id": ["y" * 5000], "dry_run": {"z": 1}}

    with pytest.raises(InvalidMessage) as caught:
        decode(body(raw))

    assert len(str(caught.value)) <= 600


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decode_of_arbitrary_bytes_raises_nothing_but_invalid_message(raw: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        decode(raw)


@settings(max_examples=200, deadline=None)
@given(
    message_type=st.sampled_from([*PAYLOAD_TYPES, "other"]),
    version=st.sampled_from([1, 1, 1, 2, None, "1", True]),
    payload=JSON,
    extra=st.dictionaries(st.sampled_from(["message_id", "occurred_at", "correlation_id"]), JSON),
)
def test_decode_of_arbitrary_envelopes_raises_nothing_but_invalid_message(
    message_type: str, version: object, payload: object, extra: dict[str, object]
) -> None:
    raw = {
        **command(),
        "type": message_type,
        "schema_version": version,
        "payload": payload,
        **extra,
    }
    with contextlib.suppress(InvalidMessage):
        decode(body(raw))


# --- request ids and bulk requests ------------------------------------------------------------


def items(*user_ids: str, action: Action = Action.PROVISION) -> tuple[ProvisioningItem, ...]:
    return tuple(
        ProvisioningItem(user_id=u, action=action, rule=Rule.EMPLOYEE_WITHOUT_SERVICE)
        for u in user_ids
    )


def test_request_id_is_deterministic() -> None:
    assert request_id_for("cust-1", "run-1", items("u-1", "u-2")) == request_id_for(
        "cust-1", "run-1", items("u-1", "u-2")
    )


@pytest.mark.parametrize(
    ("customer_id", "run_id", "content"),
    [
        ("cust-2", "run-1", items("u-1", "u-2")),
        ("cust-1", "run-2", items("u-1", "u-2")),
        ("cust-1", "run-1", items("u-1")),
        ("cust-1", "run-1", items("u-1", "u-3")),
        ("cust-1", "run-1", items("u-1", "u-2", action=Action.DEPROVISION)),
    ],
)
def test_request_id_changes_with_customer_run_or_items(
    customer_id: str, run_id: str, content: tuple[ProvisioningItem, ...]
) -> None:
    assert request_id_for(customer_id, run_id, content) != request_id_for(
        "cust-1", "run-1", items("u-1", "u-2")
    )


def test_request_id_fits_the_services_manager_limit() -> None:
    request_id = request_id_for("c" * 128, "r" * 128, items(*(f"u-{n}" for n in range(1000))))

    assert 0 < len(request_id) <= 128


def big_plan(provisions: int, deprovisions: int) -> Plan:
    sm_users = [
        SmUser(
            id=f"u-{n:05}", state=SharefileState.NOT_PROVISIONED, email=f"new{n:05}@acme.example"
        )
        for n in range(provisions)
    ]
    sm_users += [
        SmUser(id=f"v-{n:05}", state=SharefileState.PROVISIONED, email=f"old{n:05}@acme.example")
        for n in range(deprovisions)
    ]
    employees = [
        SharefileUser(id=f"sf-{n:05}", email=f"new{n:05}@acme.example") for n in range(provisions)
    ]
    policy = Policy(guard=SafetyGuard(max_deprovision=10_000, max_deprovision_ratio=1.0))
    return reconcile(sm_users, employees, policy, customer_id="cust-1")


def test_large_plan_is_split_into_requests_of_at_most_one_thousand_items() -> None:
    plan = big_plan(2_000, 500)

    requests = provisioning_requests(plan, customer_id="cust-1", run_id="run-1")

    assert [len(r.items) for r in requests] == [1000, 1000, 500]
    assert all(len(r.items) <= MAX_ITEMS_PER_REQUEST for r in requests)
    assert [(r.part, r.parts) for r in requests] == [(1, 3), (2, 3), (3, 3)]
    assert len({r.request_id for r in requests}) == 3
    assert [i.user_id for r in requests for i in r.items] == [i.user_id for i in plan.actions]
    for request in requests:
        assert request.request_id == request_id_for("cust-1", "run-1", request.items)
        assert request.customer_id == "cust-1"
        assert request.run_id == "run-1"


def test_splitting_the_same_plan_again_gives_the_same_requests() -> None:
    plan = big_plan(2_000, 500)

    first = provisioning_requests(plan, customer_id="cust-1", run_id="run-1")
    again = provisioning_requests(plan, customer_id="cust-1", run_id="run-1")

    assert first == again


def test_request_items_carry_action_email_and_rule() -> None:
    plan = big_plan(1, 1)

    [request] = provisioning_requests(plan, customer_id="cust-1", run_id="run-1")

    assert [(i.user_id, i.action, i.email, i.rule) for i in request.items] == [
        ("u-00000", Action.PROVISION, "new00000@acme.example", Rule.EMPLOYEE_WITHOUT_SERVICE),
        ("v-00000", Action.DEPROVISION, "old00000@acme.example", Rule.ABSENT_FROM_SHAREFILE),
    ]
    assert (request.part, request.parts) == (1, 1)


def test_plan_without_actions_needs_no_request() -> None:
    assert provisioning_requests(big_plan(0, 0), customer_id="cust-1", run_id="run-1") == []


def test_held_removals_are_not_requested() -> None:
    sm_users = [
        SmUser(id=f"u-{n}", state=SharefileState.PROVISIONED, email=f"u{n}@acme.example")
        for n in range(3)
    ]
    plan = reconcile(sm_users, [], customer_id="cust-1")

    assert plan.is_held
    assert provisioning_requests(plan, customer_id="cust-1", run_id="run-1") == []


# --- report payloads ----------------------------------------------------------------------------


def test_report_payload_of_a_completed_sync_is_sync_completed() -> None:
    payload = report_payload(REPORT)

    assert type(payload) is SyncCompleted
    assert payload.message_type == "sync.completed"
    assert payload.model_dump() == REPORT.model_dump()


def test_report_payload_of_a_held_sync_is_sync_held() -> None:
    sm_users = [
        SmUser(id=f"u-{n}", state=SharefileState.PROVISIONED, email=f"u{n}@acme.example")
        for n in range(3)
    ]
    report = SyncReport.from_plan(
        reconcile(sm_users, [], customer_id="cust-1"),
        customer_id="cust-1",
        run_id="r",
        dry_run=False,
    )

    payload = report_payload(report)

    assert type(payload) is SyncHeld
    assert payload.message_type == "sync.held"
    assert [r.code for r in payload.hold_reasons] == [HoldCode.SOURCE_EMPTY]


def _report_with_every_kind_of_entry(*, held: bool) -> SyncReport:
    """A report whose every list has an entry: provision, removals (done or held), in-flight
    requests, skips, conflicts and unmatched ShareFile users."""
    sm_users = [
        SmUser(id="new", state=SharefileState.NOT_PROVISIONED, email="new@acme.example"),
        SmUser(id="gone", state=SharefileState.PROVISIONED, email="gone@acme.example"),
        SmUser(id="busy", state=SharefileState.PROVISIONING, email="busy@acme.example"),
        SmUser(
            id="off", state=SharefileState.NOT_PROVISIONED, email="off@acme.example", enabled=False
        ),
        SmUser(id="anon", state=SharefileState.PROVISIONED, email=None),
        SmUser(id="twin-1", state=SharefileState.PROVISIONED, email="twin@acme.example"),
        SmUser(id="twin-2", state=SharefileState.NOT_PROVISIONED, email="twin@acme.example"),
    ]
    sharefile_users = [
        SharefileUser(id=f"sf-{name}", email=f"{name}@acme.example", first_name="A", last_name="B")
        for name in ("new", "busy", "off", "twin", "stray")
    ]
    policy = Policy(guard=SafetyGuard(max_deprovision=0)) if held else Policy()
    plan = reconcile(sm_users, sharefile_users, policy, customer_id="cust-1")
    assert plan.is_held is held
    return SyncReport.from_plan(
        plan, customer_id="cust-1", run_id="run-1", dry_run=False, request_ids=("req-1",)
    )


@pytest.mark.parametrize("held", [False, True], ids=["completed", "held"])
def test_report_payload_carries_the_report_unchanged(held: bool) -> None:
    report = _report_with_every_kind_of_entry(held=held)
    lists = ["provision", "unmatched", "conflicts", "pending", "skipped"]
    lists += ["held", "hold_reasons"] if held else ["deprovision"]
    assert all(getattr(report, name) for name in lists)

    payload = report_payload(report)

    # The same payload, to the byte, as rebuilding it from the report's dump would give.
    rebuilt = REPORT_TYPES[report.outcome].model_validate(report.model_dump())
    assert payload == rebuilt
    assert payload.model_dump_json() == rebuilt.model_dump_json()
    assert payload.model_dump() == report.model_dump()


def test_report_payload_checks_the_customer_id_the_wire_allows() -> None:
    # A SyncReport takes any text; the message that carries it obeys the wire's id alphabet.
    report = SyncReport.failure(customer_id="not an id", run_id="r", dry_run=False, error="x")

    with pytest.raises(ValidationError, match="customer_id"):
        report_payload(report)


def test_report_payload_of_a_failed_sync_is_sync_failed() -> None:
    report = SyncReport.failure(customer_id="cust-1", run_id="r", dry_run=True, error="SM said 500")

    payload = report_payload(report)

    assert type(payload) is SyncFailed
    assert payload.message_type == "sync.failed"
    assert payload.error == "SM said 500"
