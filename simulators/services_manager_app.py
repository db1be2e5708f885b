"""The Services Manager simulator: the SM REST contract v1 over a scenario's customers and users."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulators.faults import FaultInjector, Faults
from simulators.scenario import Scenario

DEFAULT_LIMIT = 500
MAX_LIMIT = 1000
MAX_ITEMS = 1000
MAX_REQUEST_ID = 128
ACTIONS = ("provision", "deprovision")
_IN_FLIGHT = frozenset({"provisioning", "deprovisioning"})
_TRANSIT = {
    "provision": ("provisioning", "provisioned"),
    "deprovision": ("deprovisioning", "not_provisioned"),
}
# Encoded user pages kept for repeated reads (every sync cycle reads every page); bounded so a
# million-user customer cannot fill memory with them (a 500-user page is ~120 kB).
_PAGE_CACHE_ENTRIES = 128
_INJECTED_CODES = {
    429: ("rate_limited", "too many requests; retry after the Retry-After delay"),
    503: ("service_unavailable", "Services Manager is temporarily unavailable"),
    504: ("gateway_timeout", "Services Manager did not answer in time"),
}

Handler = Callable[[Request], Awaitable[Response]]


# One encoder for every answer: json.dumps with non-default options builds a new one per call,
# which costs about a third of a small page's encoding time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Compact, UTF-8 (not \u-escaped) JSON: what the contract says and cheaper to send.
    content = _ENCODER.encode(body).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """The contract's only error shape: {"error": {"code", "message"}}."""
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_cursor(offset: int) -> str:
    """Opaque to clients: they must follow it, never build it."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    prefix, _, number = text.partition(":")
    if prefix != "offset" or not number.isdigit():
        return None
    return int(number)


@dataclass
class _Customer:
    """One customer's mutable SM state; every field is guarded by SmState.lock."""

    id: str
    contract: dict[str, Any]  # the customer object as GET /customers answers it
    users: list[dict[str, Any]]  # scenario objects, never mutated (scenarios are reusable)
    index: dict[str, int]
    # user_id -> the current "sharefile" object, only for users whose state changed.
    overlay: dict[str, dict[str, str]] = field(default_factory=dict)
    # (due monotonic time, user_id, final state), in due order since apply_delay_s is constant.
    due: deque[tuple[float, str, str]] = field(default_factory=deque)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    # user_id -> (request_id, action) of the last change accepted for that user.
    last_accepted: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Bumped by every state change: an encoded page of another version is stale.
    version: int = 0

    def service(self, user: dict[str, Any]) -> dict[str, str]:
        return self.overlay.get(user["id"]) or user["sharefile"]

    def apply_due(self, now: float) -> None:
        due = self.due
        if not due or due[0][0] > now:
            return
        stamp = _utc_now()
        while due and due[0][0] <= now:
            _, user_id, final = due.popleft()
            # A fresh dict, never an update: pages serialised outside the lock stay consistent.
            self.overlay[user_id] = {"state": final, "updated_at": stamp}
        self.version += 1


class SmState:
    """Services Manager's data: users' ShareFile states, stored bulk results, every submission.

    Shared between the server's event loop thread and the caller's thread, hence one lock; each
    critical section is O(page) or O(request items).
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        apply_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apply_delay_s = apply_delay_s
        self.clock = clock
        self.lock = threading.Lock()
        self.customers: dict[str, _Customer] = {}
        for customer in scenario.customers:
            self.customers[customer.id] = _Customer(
                id=customer.id,
                contract={
                    "id": customer.id,
                    "name": customer.name,
                    "sharefile": {
                        "enabled": customer.sharefile_enabled,
                        "subdomain": customer.subdomain,
                    },
                },
                users=customer.sm_users,
                index={user["id"]: position for position, user in enumerate(customer.sm_users)},
            )
        self.customer_list = [customer.contract for customer in self.customers.values()]
        self.submissions: list[dict[str, Any]] = []
        self.duplicate_effective = 0
        self._pages: OrderedDict[tuple[str, int, int], tuple[int, bytes]] = OrderedDict()

    def users_page(self, customer: _Customer, offset: int, limit: int) -> bytes:
        """The encoded page {"items", "next_cursor"}; re-encoded only after a state change."""
        key = (customer.id, offset, limit)
        with self.lock:
            customer.apply_due(self.clock())
            version = customer.version
            cached = self._pages.get(key)
            if cached is not None and cached[0] == version:
                self._pages.move_to_end(key)
                return cached[1]
            overlay = customer.overlay
            page = customer.users[offset : offset + limit]
            if overlay:
                page = [
                    {**user, "sharefile": overlay[user["id"]]} if user["id"] in overlay else user
                    for user in page
                ]
        # Encoded outside the lock: the page holds only objects that are never mutated.
        content = _ENCODER.encode(_page_body(page, offset, limit, len(customer.users))).encode()
        with self.lock:
            self._pages[key] = (version, content)
            self._pages.move_to_end(key)
            if len(self._pages) > _PAGE_CACHE_ENTRIES:
                self._pages.popitem(last=False)
        return content

    def states(self) -> dict[str, dict[str, str]]:
        with self.lock:
            now = self.clock()
            result: dict[str, dict[str, str]] = {}
            for customer in self.customers.values():
                customer.apply_due(now)
                service = customer.service
                result[customer.id] = {
                    user["id"]: service(user)["state"] for user in customer.users
                }
            return result

    def record(
        self,
        customer_id: str,
        request_id: Any,
        items: Any,
        *,
        replayed: bool,
        status_code: int,
    ) -> None:
        entry = _submission(
            customer_id, request_id, items, replayed=replayed, status_code=status_code
        )
        with self.lock:
            self.submissions.append(entry)

    def submit(
        self, customer: _Customer, request_id: str, items: list[dict[str, str]]
    ) -> tuple[int, dict[str, Any]]:
        """Apply one validated bulk request; (200, stored result) when request_id is known."""
        with self.lock:
            now = self.clock()
            customer.apply_due(now)
            stored = customer.results.get(request_id)
            if stored is not None:
                self.submissions.append(
                    _submission(customer.id, request_id, items, replayed=True, status_code=200)
                )
                return 200, stored
            stamp = _utc_now()
            answers = []
            for item in items:
                user_id, action = item["user_id"], item["action"]
                previous = customer.last_accepted.get(user_id)
                if previous is not None and previous[0] != request_id and previous[1] == action:
                    # See SimulatorServers.duplicate_effective_submissions for what this counts.
                    self.duplicate_effective += 1
                rejection = self._rejection(customer, user_id, action)
                if rejection is not None:
                    code, message = rejection
                    answers.append(
                        {
                            "user_id": user_id,
                            "action": action,
                            "status": "rejected",
                            "error": {"code": code, "message": message},
                        }
                    )
                    continue
                transit, final = _TRANSIT[action]
                customer.overlay[user_id] = {"state": transit, "updated_at": stamp}
                customer.due.append((now + self.apply_delay_s, user_id, final))
                customer.version += 1
                customer.last_accepted[user_id] = (request_id, action)
                answers.append({"user_id": user_id, "action": action, "status": "accepted"})
            result = {"request_id": request_id, "status": "accepted", "items": answers}
            customer.results[request_id] = result
            self.submissions.append(
                _submission(customer.id, request_id, items, replayed=False, status_code=202)
            )
            return 202, result

    @staticmethod
    def _rejection(customer: _Customer, user_id: str, action: str) -> tuple[str, str] | None:
        position = customer.index.get(user_id)
        if position is None:
            return "unknown_user", f"customer {customer.id} has no user {user_id}"
        user = customer.users[position]
        state = customer.service(user)["state"]
        if state in _IN_FLIGHT:
            return "request_in_flight", f"user {user_id} is {state}; wait for it to finish"
        if action == "provision":
            if state == "provisioned":
                return "already_in_state", f"user {user_id} is already provisioned"
            if user.get("enabled") is False:
                return "user_disabled", f"user {user_id} is disabled and cannot be provisioned"
        elif state == "not_provisioned":
            return "already_in_state", f"user {user_id} is already not_provisioned"
        return None


def _submission(
    customer_id: str, request_id: Any, items: Any, *, replayed: bool, status_code: int
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "request_id": request_id,
        "items": items if isinstance(items, list) else [],
        "replayed": replayed,
        "status_code": status_code,
    }


def _validate_bulk(body: Any) -> tuple[str, list[dict[str, str]]] | str:
    """The request_id and items of a valid bulk request, or why it is invalid."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        return "request_id must be a non-empty string"
    if len(request_id) > MAX_REQUEST_ID:
        return f"request_id must be at most {MAX_REQUEST_ID} characters"
    items = body.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        return f"items must be a list of 1 to {MAX_ITEMS} items"
    seen: set[str] = set()
    clean: list[dict[str, str]] = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            return f"items[{position}] must be an object"
        user_id, action = item.get("user_id"), item.get("action")
        if not isinstance(user_id, str) or not user_id:
            return f"items[{position}].user_id must be a non-empty string"
        if action not in ACTIONS:
            return f"items[{position}].action must be 'provision' or 'deprovision'"
        if user_id in seen:
            return f"user {user_id} appears more than once in items"
        seen.add(user_id)
        clean.append({"user_id": user_id, "action": action})
    return request_id, clean


def _paging(request: Request) -> tuple[int, int] | str:
    """(offset, limit) from ?limit&cursor, or why they are invalid."""
    raw_limit = request.query_params.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            return f"limit must be an integer from 1 to {MAX_LIMIT}"
        limit = int(raw_limit)
    cursor = request.query_params.get("cursor")
    offset = 0
    if cursor:
        decoded = decode_cursor(cursor)
        if decoded is None:
            return "cursor is not one this server issued"
        offset = decoded
    return offset, limit


def _page_body(items: list[dict[str, Any]], offset: int, limit: int, total: int) -> dict[str, Any]:
    end = offset + limit
    return {"items": items, "next_cursor": encode_cursor(end) if end < total else None}


class ServicesManagerApp:
    """The Starlette app; `faults` may be replaced while it runs (set_faults)."""

    def __init__(self, scenario: Scenario, state: SmState, faults: Faults) -> None:
        self.state = state
        self.stopping = threading.Event()  # set by the server's owner before shutdown
        self.injector = FaultInjector(faults, self.stopping)
        self._authorization = f"Bearer {scenario.sm_token}"
        self.requests_served = 0
        api = "/api/v1"
        routes = [
            Route("/_sim/health", self._health, methods=["GET"]),
            Route("/_sim/state", self._sim_state, methods=["GET"]),
            Route("/_sim/submissions", self._sim_submissions, methods=["GET"]),
            Route("/_sim/stats", self._sim_stats, methods=["GET"]),
            Route(f"{api}/customers", self._guarded(self._customers), methods=["GET"]),
            Route(
                f"{api}/customers/{{customer_id}}", self._guarded(self._customer), methods=["GET"]
            ),
            Route(
                f"{api}/customers/{{customer_id}}/users",
                self._guarded(self._users),
                methods=["GET"],
            ),
            Route(
                f"{api}/customers/{{customer_id}}/provisioning-requests",
                self._guarded(self._submit),
                methods=["POST"],
            ),
            Route(
                f"{api}/customers/{{customer_id}}/provisioning-requests/{{request_id}}",
                self._guarded(self._stored_result),
                methods=["GET"],
            ),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    def set_faults(self, faults: Faults) -> None:
        # One attribute swap: the event loop thread sees either the old or the new injector.
        self.injector = FaultInjector(faults, self.stopping)

    def _guarded(self, handler: Handler) -> Handler:
        """Faults first (they stand for the network and the gateway), then the bearer token."""

        async def endpoint(request: Request) -> Response:
            self.requests_served += 1
            customer_id = request.path_params.get("customer_id")
            keys: Iterable[str] = (customer_id,) if customer_id else ()
            injected = await self.injector.before(keys)
            if injected is not None:
                code, message = _INJECTED_CODES[injected.status]
                headers = {"Retry-After": injected.retry_after} if injected.retry_after else None
                return error_response(injected.status, code, message, headers)
            if request.headers.get("authorization") != self._authorization:
                return error_response(401, "unauthorized", "missing or invalid bearer token")
            return await handler(request)

        return endpoint

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "invalid_request"}.get(exc.status_code, "invalid_request")
        return error_response(
            exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
        )

    def _customer_or_404(self, request: Request) -> _Customer | Response:
        customer_id = request.path_params["customer_id"]
        customer = self.state.customers.get(customer_id)
        if customer is None:
            return error_response(404, "not_found", f"no customer {customer_id}")
        return customer

    async def _customers(self, request: Request) -> Response:
        paging = _paging(request)
        if isinstance(paging, str):
            return error_response(400, "invalid_request", paging)
        offset, limit = paging
        everyone = self.state.customer_list
        return json_response(
            _page_body(everyone[offset : offset + limit], offset, limit, len(everyone))
        )

    async def _customer(self, request: Request) -> Response:
        customer = self._customer_or_404(request)
        if isinstance(customer, Response):
            return customer
        return json_response(customer.contract)

    async def _users(self, request: Request) -> Response:
        customer = self._customer_or_404(request)
        if isinstance(customer, Response):
            return customer
        paging = _paging(request)
        if isinstance(paging, str):
            return error_response(400, "invalid_request", paging)
        offset, limit = paging
        content = self.state.users_page(customer, offset, limit)
        return Response(content, media_type="application/json")

    async def _submit(self, request: Request) -> Response:
        customer_id = request.path_params["customer_id"]
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.state.record(customer_id, None, None, replayed=False, status_code=400)
            return error_response(400, "invalid_request", "the body is not valid JSON")
        request_id = body.get("request_id") if isinstance(body, dict) else None
        posted_items = body.get("items") if isinstance(body, dict) else None
        customer = self._customer_or_404(request)
        if isinstance(customer, Response):
            self.state.record(
                customer_id, request_id, posted_items, replayed=False, status_code=404
            )
            return customer
        valid = _validate_bulk(body)
        if isinstance(valid, str):
            self.state.record(
                customer_id, request_id, posted_items, replayed=False, status_code=400
            )
            return error_response(400, "invalid_request", valid)
        status, result = self.state.submit(customer, *valid)
        return json_response(result, status)

    async def _stored_result(self, request: Request) -> Response:
        customer = self._customer_or_404(request)
        if isinstance(customer, Response):
            return customer
        request_id = request.path_params["request_id"]
        with self.state.lock:
            result = customer.results.get(request_id)
        if result is None:
            return error_response(404, "not_found", f"no provisioning request {request_id}")
        return json_response(result)

    async def _health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _sim_state(self, request: Request) -> Response:
        return json_response(self.state.states())

    async def _sim_submissions(self, request: Request) -> Response:
        with self.state.lock:
            submissions = list(self.state.submissions)
        return json_response(submissions)

    async def _sim_stats(self, request: Request) -> Response:
        with self.state.lock:
            submissions = len(self.state.submissions)
            duplicates = self.state.duplicate_effective
        return json_response(
            {
                "requests_served": self.requests_served,
                "submissions": submissions,
                "duplicate_effective_submissions": duplicates,
            }
        )
