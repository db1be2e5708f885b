"""The ShareFile simulator: OAuth password/refresh grants, the Employees and Clients feeds."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulators.faults import FaultInjector, Faults
from simulators.scenario import Scenario

API_CONTROL_PLANE = "sf-api.com"
APP_CONTROL_PLANE = "sharefile.com"
_STATUS_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_INJECTED_MESSAGES = {
    429: "Excessive usage is curtailed programmatically; retry later.",
    503: "The service is temporarily unavailable.",
    504: "The request timed out.",
}

Handler = Callable[[Request], Awaitable[Response]]

# Encoded pages kept for repeated fetches (every sync cycle reads the same feed). The feeds never
# change while the server runs, so an entry is never stale; the bound caps memory at roughly
# this many pages (a 500-item page is ~150 kB).
_PAGE_CACHE_ENTRIES = 128

# Employees per page of the feed, unless the server is told otherwise.
SHAREFILE_PAGE_SIZE = 500


# One encoder for every answer: json.dumps with non-default options builds a new one per call,
# which costs about a third of a small page's encoding time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = _ENCODER.encode(body).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """ShareFile's error shape: {"code": "<HTTP status name>", "message": {"lang", "value"}}."""
    body = {
        "code": _STATUS_NAMES.get(status, str(status)),
        "message": {"lang": "en-US", "value": message},
    }
    return json_response(body, status, headers)


@dataclass(frozen=True)
class _Account:
    customer_id: str
    subdomain: str
    employees: list[dict[str, Any]]
    clients: list[dict[str, Any]]


class SharefileState:
    """Accounts by subdomain and the tokens issued for them (shared with the caller's thread)."""

    def __init__(self, scenario: Scenario, *, token_ttl_s: int = 28800) -> None:
        self.token_ttl_s = token_ttl_s
        self.credentials = dict(scenario.sharefile_credentials)
        # Host names are case-insensitive, so subdomains are too.
        self.accounts = {
            customer.subdomain.lower(): _Account(
                customer.id,
                customer.subdomain,
                customer.sharefile_employees,
                customer.sharefile_clients,
            )
            for customer in scenario.customers
        }
        self.lock = threading.Lock()
        self._access: dict[str, tuple[str, float]] = {}  # token -> (subdomain key, expiry)
        self._refresh: dict[str, str] = {}  # refresh token -> subdomain key

    def issue(self, subdomain_key: str) -> tuple[str, str]:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        with self.lock:
            self._access[access] = (subdomain_key, time.monotonic() + self.token_ttl_s)
            self._refresh[refresh] = subdomain_key
        return access, refresh

    def access_valid(self, token: str, subdomain_key: str) -> bool:
        with self.lock:
            entry = self._access.get(token)
        return entry is not None and entry[0] == subdomain_key and time.monotonic() < entry[1]

    def refresh_valid(self, token: str, subdomain_key: str) -> bool:
        with self.lock:
            return self._refresh.get(token) == subdomain_key

    def expire_access_tokens(self) -> None:
        with self.lock:
            self._access.clear()


def _project(items: list[dict[str, Any]], select: list[str] | None) -> list[dict[str, Any]]:
    if select is None:
        return items
    wanted = set(select)
    # OData keeps its own annotations (odata.type) whatever $select says.
    return [
        {key: value for key, value in item.items() if key in wanted or key.startswith("odata.")}
        for item in items
    ]


class SharefileApp:
    """The Starlette app; `faults` may be replaced while it runs (set_faults)."""

    def __init__(
        self,
        state: SharefileState,
        faults: Faults,
        *,
        page_size: int | None = SHAREFILE_PAGE_SIZE,
    ) -> None:
        if page_size is not None and page_size < 1:
            raise ValueError("sharefile_page_size must be positive or None")
        self.state = state
        self.page_size = page_size
        self.stopping = threading.Event()  # set by the server's owner before shutdown
        self.injector = FaultInjector(faults, self.stopping)
        self.requests_served = 0
        # Only touched on the event loop thread.
        self._pages: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        routes = [
            Route("/_sim/health", self._health, methods=["GET"]),
            Route("/_sim/stats", self._sim_stats, methods=["GET"]),
            Route("/_sim/expire-tokens", self._sim_expire_tokens, methods=["POST"]),
            Route("/{subdomain}/oauth/token", self._guarded(self._token), methods=["POST"]),
            Route(
                "/{subdomain}/sf/v3/Accounts/Employees",
                self._guarded(self._employees, feed=True),
                methods=["GET"],
            ),
            Route(
                "/{subdomain}/sf/v3/Accounts/Clients",
                self._guarded(self._clients, feed=True),
                methods=["GET"],
            ),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    def set_faults(self, faults: Faults) -> None:
        self.injector = FaultInjector(faults, self.stopping)

    def _guarded(self, handler: Handler, *, feed: bool = False) -> Handler:
        """Faults, then the subdomain, then (for API calls) the bearer token of that subdomain."""

        async def endpoint(request: Request) -> Response:
            self.requests_served += 1
            subdomain = request.path_params["subdomain"]
            account = self.state.accounts.get(subdomain.lower())
            keys = (subdomain, account.customer_id) if account is not None else (subdomain,)
            injected = await self.injector.before(keys)
            if injected is not None:
                headers = {"Retry-After": injected.retry_after} if injected.retry_after else None
                return error_response(injected.status, _INJECTED_MESSAGES[injected.status], headers)
            if account is None:
                return error_response(404, f"Account {subdomain} not found")
            if feed:
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not self.state.access_valid(
                    token, subdomain.lower()
                ):
                    return error_response(401, "Unauthorized: the access token is not valid")
            request.state.account = account
            return await handler(request)

        return endpoint

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def _token(self, request: Request) -> Response:
        account: _Account = request.state.account
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return error_response(400, "The body must be application/x-www-form-urlencoded")
        try:
            form = {
                key: values[0] for key, values in parse_qs((await request.body()).decode()).items()
            }
        except UnicodeDecodeError:
            return error_response(400, "The body is not valid UTF-8")
        expected = self.state.credentials
        client_ok = (
            form.get("client_id") == expected["client_id"]
            and form.get("client_secret") == expected["client_secret"]
        )
        subdomain_key = account.subdomain.lower()
        grant = form.get("grant_type")
        if grant == "password":
            if not (
                client_ok
                and form.get("username") == expected["username"]
                and form.get("password") == expected["password"]
            ):
                return error_response(401, "Invalid client or user credentials")
        elif grant == "refresh_token":
            if not (
                client_ok and self.state.refresh_valid(form.get("refresh_token", ""), subdomain_key)
            ):
                return error_response(401, "Invalid client credentials or refresh token")
        else:
            return error_response(400, f"Unsupported grant_type {grant!r}")
        access, refresh = self.state.issue(subdomain_key)
        return json_response(
            {
                "access_token": access,
                "refresh_token": refresh,
                "token_type": "bearer",
                "expires_in": self.state.token_ttl_s,
                "subdomain": account.subdomain,
                "apicp": API_CONTROL_PLANE,
                "appcp": APP_CONTROL_PLANE,
            }
        )

    async def _employees(self, request: Request) -> Response:
        account: _Account = request.state.account
        faults = self.injector.faults
        keys = (account.subdomain, account.customer_id)
        items = account.employees
        declared = len(items)
        if self.injector.matches(faults.empty_customers, keys):
            items, declared = [], 0
        elif self.injector.matches(faults.truncated_customers, keys):
            # The feed announces more than it will ever serve, as a feed cut off upstream would.
            declared = len(items) + max(1, len(items) // 10)
        return self._feed(request, "Accounts/Employees", items, declared)

    async def _clients(self, request: Request) -> Response:
        account: _Account = request.state.account
        return self._feed(request, "Accounts/Clients", account.clients, len(account.clients))

    def _feed(
        self, request: Request, resource: str, items: list[dict[str, Any]], declared: int
    ) -> Response:
        """One OData page: odata.count is the whole collection's, nextLink absolute."""
        account: _Account = request.state.account
        subdomain = request.path_params["subdomain"]
        params = request.query_params
        try:
            skip = int(params.get("$skip", "0"))
            top = int(params["$top"]) if "$top" in params else None
        except ValueError:
            return error_response(400, "$skip and $top must be integers")
        if skip < 0 or (top is not None and top < 0):
            return error_response(400, "$skip and $top must not be negative")
        select_raw = params.get("$select")
        select = [name.strip() for name in select_raw.split(",")] if select_raw else None
        # base_url carries the host and port the client used, so links work behind any port.
        api_base = f"{request.base_url}{subdomain}/sf/v3/"
        window_end = len(items) if top is None else min(len(items), skip + top)
        page_end = window_end if self.page_size is None else min(window_end, skip + self.page_size)
        if self.injector.matches(
            self.injector.faults.malformed_customers, (subdomain, account.customer_id)
        ):
            # A 200 whose JSON stops halfway: what a proxy that cut the connection delivers.
            broken = (
                f'{{"odata.metadata":"{api_base}$metadata#Contacts",'
                f'"odata.count":{declared},"value":[{{"Id":"'
            )
            return Response(broken.encode(), media_type="application/json")
        key = (api_base, resource, skip, page_end, window_end, select_raw, declared, len(items))
        content = self._pages.get(key)
        if content is not None:
            self._pages.move_to_end(key)
            return Response(content, media_type="application/json")
        body: dict[str, Any] = {
            "odata.metadata": f"{api_base}$metadata#Contacts",
            "odata.count": declared,
            "value": _project(items[skip:page_end], select),
        }
        if page_end < window_end:
            query = f"$skip={page_end}"
            if top is not None:
                query += f"&$top={window_end - page_end}"
            if select_raw:
                query += f"&$select={quote(select_raw, safe=',')}"
            body["odata.nextLink"] = f"{api_base}{resource}?{query}"
        content = _ENCODER.encode(body).encode()
        self._pages[key] = content
        if len(self._pages) > _PAGE_CACHE_ENTRIES:
            self._pages.popitem(last=False)
        return Response(content, media_type="application/json")

    async def _health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _sim_stats(self, request: Request) -> Response:
        return json_response({"requests_served": self.requests_served})

    async def _sim_expire_tokens(self, request: Request) -> Response:
        self.state.expire_access_tokens()
        return json_response({"expired": True})
