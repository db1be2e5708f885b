"""The Services Manager REST client (contract v1): customers, users, bulk provisioning."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode

import httpx
from pydantic import SecretStr, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from adapters.http import (
    MAX_EMPTY_PAGES,
    HttpApiClient,
    RetryPolicy,
    body_text,
    is_sendable_token,
    malformed,
    parse_json,
    send_with_retry,
    server_text,
    validated_page,
)
from domain.errors import ConfigError, PermanentError
from domain.messages import MAX_ITEMS_PER_REQUEST, ProvisioningItem
from domain.records import SM_USER, BulkResult, Customer, SmUser

_log = logging.getLogger("sfsync.adapters.services_manager")

MAX_PAGE_SIZE = 1000  # the contract's ceiling for ?limit=
DEFAULT_PAGE_SIZE = 500

CALL_LIST_CUSTOMERS = "GET sm customers"
CALL_GET_CUSTOMER = "GET sm customer"
CALL_LIST_USERS = "GET sm users"
CALL_SUBMIT = "POST sm provisioning-requests"
CALL_GET_REQUEST = "GET sm provisioning-requests"

_T = TypeVar("_T")


class _UsersPage(TypedDict):
    """A users page as the contract has it, for the one-pass fast path (`validated_page`)."""

    items: list[SmUser]
    # Required, as the contract has it (null on the last page): a page without it, say with the
    # key renamed, would otherwise end the list after one page without a word.
    next_cursor: str | None


_USERS_PAGE = TypeAdapter(_UsersPage)


class ServicesManagerClient(HttpApiClient):
    """Implements domain.ports.ServicesManagerPort over HTTP; safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        token: SecretStr | str,
        *,
        http: httpx.Client | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, not {page_size}")
        self._base = base_url.rstrip("/")
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        if not is_sendable_token(self._token.get_secret_value()):
            # Caught here, at start-up: sent, it would fail every call with an error quoting it.
            raise ConfigError(
                "the Services Manager token is empty or holds characters a bearer token cannot "
                "(whitespace such as a trailing newline, control or non-ASCII characters)"
            )
        super().__init__(http)
        self._retry = retry
        self._page_size = page_size

    def __repr__(self) -> str:
        return f"ServicesManagerClient(base_url={self._base!r})"

    # -- customers -------------------------------------------------------------------------

    def list_customers(self) -> Iterator[Customer]:
        """Every customer with ShareFile enabled, following next_cursor until it is null."""
        for customer in self._pages(
            "/customers",
            call=CALL_LIST_CUSTOMERS,
            customer_id=None,
            parse=lambda index, item: self._customer(item, call=CALL_LIST_CUSTOMERS, index=index),
        ):
            if customer.sharefile_enabled:
                yield customer

    def get_customer(self, customer_id: str) -> Customer:
        url = f"{self._base}/customers/{_segment(customer_id)}"
        body = self._request("GET", url, call=CALL_GET_CUSTOMER, customer_id=customer_id)
        customer = self._customer(body, call=CALL_GET_CUSTOMER, index=None, customer_id=customer_id)
        if customer.id != customer_id:
            # Another customer's record names another ShareFile account: reconciled against this
            # customer's users, its employees would make every one of them look absent.
            raise malformed(
                f"asked for customer {customer_id!r}, got {customer.id!r}",
                call=CALL_GET_CUSTOMER,
                customer_id=customer_id,
            )
        return customer

    # -- users -------------------------------------------------------------------------------

    def list_users(self, customer_id: str) -> Iterator[SmUser]:
        """The customer's users, one page at a time: a page is parsed, yielded and dropped."""

        def parse(index: int, item: object) -> SmUser:
            try:
                return SM_USER.validate_python(item)
            except ValidationError as exc:
                raise malformed(
                    f"user #{index}: {_problems(exc)}",
                    call=CALL_LIST_USERS,
                    customer_id=customer_id,
                ) from None

        path = f"/customers/{_segment(customer_id)}/users"
        yield from self._pages(
            path, call=CALL_LIST_USERS, customer_id=customer_id, parse=parse, fast=_USERS_PAGE
        )

    # -- provisioning requests ---------------------------------------------------------------

    def submit(
        self, customer_id: str, request_id: str, items: Sequence[ProvisioningItem]
    ) -> BulkResult:
        """POST one bulk request. Retrying it is safe: SM answers a known request_id with 200."""
        if not 1 <= len(items) <= MAX_ITEMS_PER_REQUEST:
            raise ValueError(
                f"a provisioning request holds 1 to {MAX_ITEMS_PER_REQUEST} items, not {len(items)}"
            )
        url = f"{self._base}/customers/{_segment(customer_id)}/provisioning-requests"
        payload = {
            "request_id": request_id,
            "items": [{"user_id": item.user_id, "action": item.action.value} for item in items],
        }
        response = self._send("POST", url, call=CALL_SUBMIT, customer_id=customer_id, json=payload)
        body = parse_json(response, call=CALL_SUBMIT, customer_id=customer_id)
        # 200 is SM's "I already had this request_id": the stored result of the first post.
        replayed = response.status_code == httpx.codes.OK
        return self._bulk_result(body, call=CALL_SUBMIT, customer_id=customer_id, replayed=replayed)

    def get_request(self, customer_id: str, request_id: str) -> BulkResult:
        url = (
            f"{self._base}/customers/{_segment(customer_id)}"
            f"/provisioning-requests/{_segment(request_id)}"
        )
        body = self._request("GET", url, call=CALL_GET_REQUEST, customer_id=customer_id)
        return self._bulk_result(
            body, call=CALL_GET_REQUEST, customer_id=customer_id, replayed=False
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        *,
        call: str,
        customer_id: str | None,
        json: object = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        return send_with_retry(
            lambda: self._http.request(method, url, json=json, headers=headers),
            call=call,
            customer_id=customer_id,
            policy=self._retry,
            describe=self._describe,
            logger=_log,
        )

    def _request(self, method: str, url: str, *, call: str, customer_id: str | None) -> Any:
        response = self._send(method, url, call=call, customer_id=customer_id)
        return parse_json(response, call=call, customer_id=customer_id)

    def _pages(
        self,
        path: str,
        *,
        call: str,
        customer_id: str | None,
        parse: Callable[[int, object], _T],
        fast: TypeAdapter[_UsersPage] | None = None,
    ) -> Iterator[_T]:
        """Every item of a list endpoint, `parse(index, raw item)`, holding one page at a time.

        With `fast`, a page that validates as a whole in one pass is taken as it is (its items
        are already what `parse` would return); any other page goes item by item through
        `parse`, which says which item is wrong and how.
        """
        url = f"{self._base}{path}"
        cursor: str | None = None
        seen_cursors: set[str] = set()
        index = 0
        page_number = 0
        empty_in_a_row = 0
        while True:
            params: dict[str, str | int] = {"limit": self._page_size}
            if cursor is not None:
                params["cursor"] = cursor
            # The query encoded here, as httpx would (urlencode), to the same URL: its `params=`
            # merges them in through two more URL parses, about 45 us, a sixth of a page's CPU.
            page_url = f"{url}?{urlencode(params)}"
            response = self._send("GET", page_url, call=call, customer_id=customer_id)
            page = validated_page(response, fast) if fast is not None else None
            items: list[object]
            if page is not None:
                items, next_cursor = cast(list[object], page["items"]), page["next_cursor"]
            else:
                items, next_cursor = self._raw_page(response, call=call, customer_id=customer_id)
            page_validated = page is not None
            del response, page
            page_number += 1
            empty_in_a_row = 0 if items else empty_in_a_row + 1
            _log.debug(
                "%s for customer %s: page %d with %d items, more=%s",
                call,
                customer_id or "-",
                page_number,
                len(items),
                next_cursor is not None,
            )
            for position in range(len(items)):
                item, items[position] = items[position], None  # release each item once yielded
                yield cast(_T, item) if page_validated else parse(index, item)
                index += 1
            del items
            if next_cursor is None:
                return
            if empty_in_a_row >= MAX_EMPTY_PAGES:
                raise malformed(
                    f"{empty_in_a_row} empty pages in a row, and still a next_cursor",
                    call=call,
                    customer_id=customer_id,
                )
            if next_cursor in seen_cursors:
                # A server that hands back a cursor it already gave would page forever.
                raise malformed(
                    f"next_cursor repeats after page {page_number}",
                    call=call,
                    customer_id=customer_id,
                )
            seen_cursors.add(next_cursor)
            cursor = next_cursor

    @staticmethod
    def _raw_page(
        response: httpx.Response, *, call: str, customer_id: str | None
    ) -> tuple[list[object], str | None]:
        """A list page's raw items and next cursor, its shape checked."""
        body = parse_json(response, call=call, customer_id=customer_id)
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise malformed(
                "expected an object with an 'items' list", call=call, customer_id=customer_id
            )
        if "next_cursor" not in body:
            raise malformed(
                "the page has no 'next_cursor' (null on the last page)",
                call=call,
                customer_id=customer_id,
            )
        next_cursor = body["next_cursor"]
        if next_cursor is not None and not isinstance(next_cursor, str):
            raise malformed(
                "'next_cursor' is neither a string nor null", call=call, customer_id=customer_id
            )
        return body["items"], next_cursor

    def _customer(
        self, raw: object, *, call: str, index: int | None, customer_id: str | None = None
    ) -> Customer:
        try:
            return Customer.model_validate(raw)
        except ValidationError as exc:
            which = f"customer #{index}" if index is not None else "customer"
            raise malformed(
                f"{which}: {_problems(exc)}", call=call, customer_id=customer_id
            ) from None

    def _bulk_result(
        self, body: object, *, call: str, customer_id: str, replayed: bool
    ) -> BulkResult:
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise malformed(
                "expected an object with an 'items' list", call=call, customer_id=customer_id
            )
        try:
            return BulkResult.model_validate(
                {
                    "request_id": body.get("request_id"),
                    "status": body.get("status"),
                    "items": [_item_result_fields(raw) for raw in body["items"]],
                    "replayed": replayed,
                }
            )
        except (ValidationError, TypeError) as exc:
            problem = _problems(exc) if isinstance(exc, ValidationError) else str(exc)
            raise malformed(problem, call=call, customer_id=customer_id) from None

    def _describe(self, response: httpx.Response) -> tuple[str | None, str]:
        """SM errors read {"error": {"code", "message"}}; anything else is shown as text."""
        code: str | None = None
        message: str | None = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code = str(error["code"]) if error.get("code") is not None else None
            message = str(error["message"]) if error.get("message") is not None else None
        secrets = (self._token.get_secret_value(),)
        text = server_text(message, secrets) if message else body_text(response, secrets)
        return (server_text(code, secrets) if code else None), text


def _item_result_fields(raw: object) -> dict[str, object]:
    """One item of SM's answer in ItemResult's flat shape: error {code, message} is unfolded."""
    if not isinstance(raw, dict):
        raise TypeError(f"an item is a JSON {type(raw).__name__}, not an object")
    error = raw.get("error")
    if error is not None and not isinstance(error, dict):
        raise TypeError("an item's 'error' is not an object")
    return {
        "user_id": raw.get("user_id"),
        "action": raw.get("action"),
        "status": raw.get("status"),
        "error_code": error.get("code") if error else None,
        "error_message": error.get("message") if error else None,
    }


def _segment(value: str) -> str:
    """Quote an id for one URL path segment, so "a/b" cannot address another resource."""
    if not value:
        raise PermanentError("empty id in a Services Manager path", call="sm path")
    return quote(value, safe="")


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors(include_input=False, include_url=False)[:5]
    )
