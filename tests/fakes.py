"""Shared fakes that satisfy the ports (domain/ports.py); tests assert on what they recorded."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from domain.errors import PermanentError, TransientError
from domain.messages import ProvisioningItem, Stamper
from domain.records import BulkResult, Customer, ItemResult, SharefileState, SharefileUser, SmUser


def fixed_stamper() -> Stamper:
    """Deterministic ids and times: message n gets UUID(int=n), one second after the last."""
    counter = iter(range(1, 10**9))
    start = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    lock = threading.Lock()

    def new_id() -> UUID:
        with lock:
            return UUID(int=next(counter))

    return Stamper(clock=lambda: start + timedelta(seconds=1), new_id=new_id)


def sm_user(
    user_id: str, email: str | None, state: str = "not_provisioned", **fields: object
) -> SmUser:
    return SmUser(id=user_id, email=email, state=SharefileState(state), **fields)  # type: ignore[arg-type]


def employee(user_id: str, email: str | None, **fields: object) -> SharefileUser:
    return SharefileUser(id=user_id, email=email, **fields)  # type: ignore[arg-type]


@dataclass
class FakeServicesManager:
    """Services Manager in memory, with the contract's idempotent bulk endpoint."""

    customers: dict[str, Customer] = field(default_factory=dict)
    users: dict[str, list[SmUser]] = field(default_factory=dict)
    submitted: list[tuple[str, str, tuple[ProvisioningItem, ...]]] = field(default_factory=list)
    # customer id -> error raised by every call for that customer
    failures: dict[str, Exception] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stored: dict[str, BulkResult] = {}
        self._lock = threading.Lock()

    def add_customer(
        self, customer_id: str, users: Sequence[SmUser] = (), *, enabled: bool = True
    ) -> None:
        self.customers[customer_id] = Customer(
            id=customer_id,
            name=customer_id,
            sharefile_enabled=enabled,
            subdomain=f"sd-{customer_id}",
        )
        self.users[customer_id] = list(users)

    def list_customers(self) -> Iterator[Customer]:
        yield from (c for c in self.customers.values() if c.sharefile_enabled)

    def get_customer(self, customer_id: str) -> Customer:
        self._maybe_fail(customer_id)
        if customer_id not in self.customers:
            raise PermanentError(
                "not_found", customer_id=customer_id, call="GET sm customer", status=404
            )
        return self.customers[customer_id]

    def list_users(self, customer_id: str) -> Iterator[SmUser]:
        self._maybe_fail(customer_id)
        yield from self.users[customer_id]

    def submit(
        self, customer_id: str, request_id: str, items: Sequence[ProvisioningItem]
    ) -> BulkResult:
        self._maybe_fail(customer_id)
        with self._lock:
            if request_id in self._stored:
                return self._stored[request_id].model_copy(update={"replayed": True})
            self.submitted.append((customer_id, request_id, tuple(items)))
            result = BulkResult(
                request_id=request_id,
                status="accepted",
                items=tuple(
                    ItemResult(user_id=i.user_id, action=i.action.value, status="accepted")
                    for i in items
                ),
            )
            self._stored[request_id] = result
            return result

    def get_request(self, customer_id: str, request_id: str) -> BulkResult:
        return self._stored[request_id]

    def _maybe_fail(self, customer_id: str) -> None:
        if customer_id in self.failures:
            raise self.failures[customer_id]


@dataclass
class FakeFeed:
    users: list[SharefileUser]
    declared_count: int | None = None
    pages: int = 1

    def __iter__(self) -> Iterator[SharefileUser]:
        return iter(self.users)


@dataclass
class FakeShareFile:
    """ShareFile employees per subdomain; `declared` overrides a feed's odata.count."""

    employees_by_subdomain: dict[str, list[SharefileUser]] = field(default_factory=dict)
    declared: dict[str, int] = field(default_factory=dict)
    failures: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def set_employees(self, customer_id: str, users: Sequence[SharefileUser]) -> None:
        self.employees_by_subdomain[f"sd-{customer_id}"] = list(users)

    def employees(self, customer: Customer, *, known: AbstractSet[str] = frozenset()) -> FakeFeed:
        assert customer.subdomain is not None
        self.calls.append(customer.subdomain)
        if customer.subdomain in self.failures:
            raise self.failures[customer.subdomain]
        users = self.employees_by_subdomain.get(customer.subdomain, [])
        return FakeFeed(
            [u for u in users if u.id not in known],
            self.declared.get(customer.subdomain, len(users)),
        )


def transient(customer_id: str) -> TransientError:
    return TransientError(
        "HTTP 503 after 5 attempts",
        customer_id=customer_id,
        call="GET sharefile Accounts/Employees",
        status=503,
    )


@dataclass
class RecordedDelivery:
    """A delivery (adapters.broker.Delivery) that records how it was settled."""

    body: bytes
    queue: str = "t.sync"
    routing_key: str = "sync.command"
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    message_id: str | None = None
    correlation_id: str | None = None
    type: str | None = None
    settled: list[str] = field(default_factory=list)

    def ack(self) -> None:
        self.settled.append("ack")

    def requeue(self) -> None:
        self.settled.append("requeue")
