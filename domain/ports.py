"""The small interfaces (ports) through which handlers reach the outside world."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

from domain.messages import Envelope, ProvisioningItem
from domain.records import BulkResult, Customer, SharefileUser, SmUser


class ServicesManagerPort(Protocol):
    def list_customers(self) -> Iterator[Customer]:
        """Every customer whose ShareFile service is enabled, following every page."""
        ...

    def get_customer(self, customer_id: str) -> Customer: ...

    def list_users(self, customer_id: str) -> Iterator[SmUser]:
        """Every user of the customer, page by page."""
        ...

    def submit(
        self, customer_id: str, request_id: str, items: Sequence[ProvisioningItem]
    ) -> BulkResult:
        """POST one bulk provisioning request; the same request_id answers the stored result."""
        ...

    def get_request(self, customer_id: str, request_id: str) -> BulkResult: ...


class EmployeeFeed(Protocol):
    """ShareFile employees of one account, streamed page by page.

    `declared_count` is the `odata.count` the feed announced (None if it did not); it is known
    once the first page has been read. `pages` counts the pages read so far: a feed of several
    pages may have been read while the account changed.
    """

    declared_count: int | None
    pages: int

    def __iter__(self) -> Iterator[SharefileUser]: ...


class ShareFilePort(Protocol):
    def employees(
        self, customer: Customer, *, known: AbstractSet[str] = frozenset()
    ) -> EmployeeFeed:
        """The account's employees; with `known`, only those whose id is not in it.

        `known` is for a second read that looks for users a first read missed: the users it
        names are left out (and need not be parsed into records), yet count as received.
        """
        ...


class Publisher(Protocol):
    def publish(self, messages: Sequence[Envelope[object]]) -> None:  # type: ignore[type-var]
        """Publish and return once the broker has confirmed every message."""
        ...
