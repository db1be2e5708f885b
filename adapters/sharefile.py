"""The ShareFile REST client (API v3): OAuth per account, and the Employees/Clients OData feeds."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NotRequired, cast
from urllib.parse import urljoin

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from adapters.credentials import CredentialStore, ShareFileCredentials
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
from domain.errors import PermanentError
from domain.records import SHAREFILE_USER, Customer, SharefileId, SharefileUser

_log = logging.getLogger("sfsync.adapters.sharefile")

CALL_TOKEN = "POST sharefile oauth/token"  # noqa: S105 - a call name, not a secret
CALL_EMPLOYEES = "GET sharefile Accounts/Employees"
CALL_CLIENTS = "GET sharefile Accounts/Clients"

# Only what reconcile reads: smaller pages, less to parse for accounts with thousands of users.
SELECTED_FIELDS = "Id,Email,FirstName,LastName,IsDisabled"
DEFAULT_TOKEN_URL_TEMPLATE = "https://{subdomain}.sharefile.com/oauth/token"  # noqa: S105 - a URL
DEFAULT_API_CONTROL_PLANE = "sf-api.com"
# The contract always sends expires_in; if a server does not, assume a short life rather than 8h.
DEFAULT_TOKEN_LIFETIME_S = 3600.0
# A subdomain becomes part of a host name (or a path in test templates): letters, digits, dashes.
_SUBDOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_HOST_SUFFIX = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


# An OData page for the one-pass fast path (`validated_page`): the users validated, the count and
# the next link taken as they are, for `_page` to check as it checks a page parsed the slow way.
_ODataPage = TypedDict(
    "_ODataPage",
    {
        "value": list[SharefileUser],
        "odata.count": NotRequired[Any],
        "@odata.count": NotRequired[Any],
        "odata.nextLink": NotRequired[Any],
        "@odata.nextLink": NotRequired[Any],
    },
)
_ODATA_PAGE = TypeAdapter(_ODataPage)


# The same page with only each user's id (the record's own rule for it), for a second read that
# looks for users a first read missed: about a quarter of the CPU of building the records.
class _Listed(TypedDict):
    id: SharefileId


_ListedPage = TypedDict(
    "_ListedPage",
    {
        "value": list[_Listed],
        "odata.count": NotRequired[Any],
        "@odata.count": NotRequired[Any],
        "odata.nextLink": NotRequired[Any],
        "@odata.nextLink": NotRequired[Any],
    },
)
_LISTED_PAGE = TypeAdapter(_ListedPage)


@dataclass(frozen=True)
class _Token:
    """One account's bearer token; the SecretStr fields keep it out of reprs."""

    access: SecretStr
    refresh: SecretStr | None
    expires_at: float
    api_base: str


class _TokenAnswer(BaseModel):
    """The token endpoint's answer; unknown fields (token_type, appcp, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    access_token: SecretStr
    refresh_token: SecretStr | None = None
    expires_in: float | None = None
    subdomain: str | None = None
    apicp: str | None = None


class _Account:
    """Per-subdomain state: the cached token, the lock guarding it, the call limiter."""

    def __init__(self, subdomain: str, credentials: ShareFileCredentials, max_calls: int) -> None:
        self.subdomain = subdomain
        self.credentials = credentials
        self.lock = threading.Lock()
        self.calls = threading.BoundedSemaphore(max_calls)
        self.token: _Token | None = None

    def secret_values(self) -> tuple[str, ...]:
        values = list(self.credentials.secret_values())
        token = self.token
        if token is not None:
            values.append(token.access.get_secret_value())
            if token.refresh is not None:
                values.append(token.refresh.get_secret_value())
        return tuple(values)


class ODataFeed:
    """Users of one ShareFile account, streamed page by page (implements domain EmployeeFeed).

    Iterate once. `declared_count` is the first page's `odata.count` (None when the feed does
    not announce one) and is known once iteration has started; `received` counts the users
    listed so far, so after a full iteration a short feed shows as declared_count > received.
    Users whose id is in `known` are listed but not yielded: a page of known users only is
    checked for ids, its count and its link, and no record of it is built.
    """

    def __init__(
        self,
        client: ShareFileClient,
        customer: Customer,
        subdomain: str,
        *,
        resource: str,
        call: str,
        is_employee: bool,
        known: AbstractSet[str] = frozenset(),
    ) -> None:
        self.declared_count: int | None = None
        self.received = 0
        self.pages = 0
        self._client = client
        self._customer = customer
        self._subdomain = subdomain
        self._resource = resource
        self._call = call
        self._is_employee = is_employee
        self._known = known
        self._started = False

    def __repr__(self) -> str:
        return (
            f"ODataFeed(customer={self._customer.id!r}, resource={self._resource!r}, "
            f"declared_count={self.declared_count!r}, received={self.received!r})"
        )

    def __iter__(self) -> Iterator[SharefileUser]:
        if self._started:
            raise RuntimeError(f"{self!r} has already been iterated; ask the client for a new feed")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[SharefileUser]:
        customer_id = self._customer.id
        url: str | None = None
        seen: set[str] = set()
        page_number = 0
        empty_in_a_row = 0
        while True:
            # The feed is the client's own helper: it may use the private page fetch.
            page = self._client._fetch_page(
                customer_id,
                self._subdomain,
                url,
                resource=self._resource,
                call=self._call,
                is_employee=self._is_employee,
                known=self._known,
            )
            page_number += 1
            self.pages = page_number
            if page_number == 1:
                self.declared_count = page.count
            _log.debug(
                "%s for customer %s: page %d with %d items (odata.count %s), more=%s",
                self._call,
                customer_id,
                page_number,
                len(page.items),
                page.count,
                page.next_url is not None,
            )
            items = page.items
            next_url = page.next_url
            validated = page.validated
            empty_in_a_row = 0 if items or page.left_out else empty_in_a_row + 1
            self.received += page.left_out
            del page
            known = self._known
            for position in range(len(items)):
                # Release each raw item as soon as it is parsed: only one page is ever held.
                raw, items[position] = items[position], None
                if validated:
                    user = cast(SharefileUser, raw)
                else:
                    user = self._user(raw, index=self.received, page_number=page_number)
                self.received += 1
                if user.id not in known:
                    yield user
            del items
            if next_url is None:
                break
            if empty_in_a_row >= MAX_EMPTY_PAGES or (
                self.declared_count is not None and page_number > self.declared_count + 1
            ):
                # A link that changes each time (a counter in it) would page forever.
                raise malformed(
                    f"odata.nextLink still given after page {page_number} "
                    f"({empty_in_a_row} empty in a row; odata.count {self.declared_count})",
                    call=self._call,
                    customer_id=customer_id,
                )
            if next_url in seen:
                raise malformed(
                    f"odata.nextLink repeats after page {page_number}",
                    call=self._call,
                    customer_id=customer_id,
                )
            seen.add(next_url)
            url = next_url
        if self.declared_count is not None and self.declared_count != self.received:
            _log.warning(
                "%s for customer %s: feed announced odata.count %d but listed %d users",
                self._call,
                customer_id,
                self.declared_count,
                self.received,
            )

    def _user(self, raw: object, *, index: int, page_number: int) -> SharefileUser:
        if not isinstance(raw, dict):
            raise malformed(
                f"item #{index} (page {page_number}) is a JSON {type(raw).__name__}, not an object",
                call=self._call,
                customer_id=self._customer.id,
            )
        # The feed, not the item, says whether this is an employee (SharefileUser.is_employee);
        # the dict is ours to change, so a server's own is_employee key cannot even fail it.
        raw["is_employee"] = self._is_employee
        try:
            return SHAREFILE_USER.validate_python(raw, context={"is_employee": self._is_employee})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'item'}: {err['msg']}"
                for err in exc.errors(include_input=False, include_url=False)[:5]
            )
            raise malformed(
                f"item #{index} (page {page_number}): {problems}",
                call=self._call,
                customer_id=self._customer.id,
            ) from None


@dataclass
class _Page:
    items: list[object]
    count: int | None
    next_url: str | None
    # True when the items are SharefileUser records already (the fast path), not raw JSON.
    validated: bool = False
    # Users listed on the page but left out of `items`: every one of them was known.
    left_out: int = 0


class ShareFileClient(HttpApiClient):
    """Implements domain.ports.ShareFilePort over HTTP; safe to share between worker threads."""

    def __init__(
        self,
        credentials: CredentialStore,
        *,
        token_url_template: str = DEFAULT_TOKEN_URL_TEMPLATE,
        api_url_template: str | None = None,
        http: httpx.Client | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        max_concurrency_per_account: int = 4,
        clock: Callable[[], float] = time.monotonic,
        token_refresh_margin_s: float = 300.0,
    ) -> None:
        if max_concurrency_per_account < 1:
            raise ValueError("max_concurrency_per_account must be at least 1")
        self._credentials = credentials
        self._token_url_template = token_url_template
        self._api_url_template = api_url_template
        super().__init__(http)
        self._retry = retry
        self._max_calls = max_concurrency_per_account
        self._clock = clock
        self._margin = token_refresh_margin_s
        self._accounts: dict[str, _Account] = {}
        self._accounts_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ShareFileClient(token_url_template={self._token_url_template!r})"

    # -- the port ----------------------------------------------------------------------------

    def employees(self, customer: Customer, *, known: AbstractSet[str] = frozenset()) -> ODataFeed:
        """The account's employees (Accounts/Employees), including disabled ones; with `known`,
        those whose id is not in it (see ODataFeed)."""
        return self._feed(
            customer,
            resource="Accounts/Employees",
            call=CALL_EMPLOYEES,
            employees=True,
            known=known,
        )

    def clients(self, customer: Customer) -> ODataFeed:
        """The account's client users (Accounts/Clients): never employees."""
        return self._feed(customer, resource="Accounts/Clients", call=CALL_CLIENTS, employees=False)

    def _feed(
        self,
        customer: Customer,
        *,
        resource: str,
        call: str,
        employees: bool,
        known: AbstractSet[str] = frozenset(),
    ) -> ODataFeed:
        subdomain = customer.subdomain
        if not subdomain or not _SUBDOMAIN.match(subdomain):
            raise PermanentError(
                f"customer has no usable ShareFile subdomain ({subdomain!r})",
                customer_id=customer.id,
                call=call,
            )
        self._account(subdomain, customer.id)  # unknown credentials fail here, not mid-stream
        return ODataFeed(
            self,
            customer,
            subdomain,
            resource=resource,
            call=call,
            is_employee=employees,
            known=known,
        )

    # -- pages -------------------------------------------------------------------------------

    def _fetch_page(
        self,
        customer_id: str,
        subdomain: str,
        url: str | None,
        *,
        resource: str,
        call: str,
        is_employee: bool,
        known: AbstractSet[str] = frozenset(),
    ) -> _Page:
        """One page of a feed: the first one (url None) or the page a nextLink points to.

        A page whose users are all `known` comes back with no items, `left_out` counting them.
        """
        account = self._account(subdomain, customer_id)
        token = self._valid_token(account, customer_id)
        page_url = url or self._first_page_url(token, resource)
        response = self._api_get(account, token, page_url, call=call, customer_id=customer_id)
        if response.status_code == httpx.codes.UNAUTHORIZED:
            # The contract: a 401 means get a new token once and retry once.
            _log.info("%s for customer %s: HTTP 401, re-authenticating once", call, customer_id)
            token = self._renewed_token(account, customer_id, rejected=token)
            page_url = url or self._first_page_url(token, resource)
            response = self._api_get(account, token, page_url, call=call, customer_id=customer_id)
            if response.status_code == httpx.codes.UNAUTHORIZED:
                code, message = self._describe(account)(response)
                raise PermanentError(
                    f"rejected a freshly issued token: {message}",
                    customer_id=customer_id,
                    call=call,
                    status=response.status_code,
                    code=code,
                )
        if known:
            listed = validated_page(response, _LISTED_PAGE)
            if listed is not None and all(user["id"] in known for user in listed["value"]):
                del response
                page = self._page(
                    listed, page_url, token, resource=resource, call=call, customer_id=customer_id
                )
                page.left_out, page.items = len(page.items), []
                return page
            # Someone new (or a page the short parse refuses): the whole page, as on a first read.
        # The feed, not the item, says whether its users are employees (SharefileUser.is_employee).
        fast = validated_page(response, _ODATA_PAGE, {"is_employee": is_employee})
        body = (
            fast if fast is not None else parse_json(response, call=call, customer_id=customer_id)
        )
        del response
        page = self._page(
            body, page_url, token, resource=resource, call=call, customer_id=customer_id
        )
        page.validated = fast is not None
        return page

    def _first_page_url(self, token: _Token, resource: str) -> str:
        return f"{urljoin(token.api_base, resource)}?$select={SELECTED_FIELDS}"

    def _page(
        self,
        body: Any,
        page_url: str,
        token: _Token,
        *,
        resource: str,
        call: str,
        customer_id: str,
    ) -> _Page:
        """Check an OData page's shape; accept OData v3 and v4 spellings and string counts."""
        if not isinstance(body, dict):
            raise malformed(
                f"expected an OData object, got a JSON {type(body).__name__}",
                call=call,
                customer_id=customer_id,
            )
        items = body.get("value")
        if not isinstance(items, list):
            raise malformed(
                "the OData answer has no 'value' list", call=call, customer_id=customer_id
            )
        raw_count = _either(body, "odata.count", "@odata.count")
        count: int | None
        if raw_count is None:
            count = None
        elif isinstance(raw_count, int) and not isinstance(raw_count, bool) and raw_count >= 0:
            count = raw_count
        elif isinstance(raw_count, str) and raw_count.isdigit():
            count = int(raw_count)
        else:
            raise malformed("odata.count is not a count", call=call, customer_id=customer_id)
        raw_next = _either(body, "odata.nextLink", "@odata.nextLink")
        if raw_next is None or raw_next == "":
            return _Page(items, count, None)
        if not isinstance(raw_next, str):
            raise malformed("odata.nextLink is not a URL", call=call, customer_id=customer_id)
        next_url = urljoin(page_url, raw_next)
        if not _same_origin(next_url, token.api_base):
            # Following it would send this account's bearer token to another host.
            raise malformed(
                f"odata.nextLink leaves the account's API ({httpx.URL(next_url).host})",
                call=call,
                customer_id=customer_id,
            )
        if not _same_path(next_url, urljoin(token.api_base, resource)):
            # Another feed (Accounts/Clients) or another account's path: its users would be
            # taken for this feed's, and the employees not read would look absent.
            raise malformed(
                f"odata.nextLink leaves the {resource} feed ({httpx.URL(next_url).path})",
                call=call,
                customer_id=customer_id,
            )
        return _Page(items, count, next_url)

    def _api_get(
        self, account: _Account, token: _Token, url: str, *, call: str, customer_id: str
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token.access.get_secret_value()}"}
        return send_with_retry(
            lambda: self._limited(account, lambda: self._http.get(url, headers=headers)),
            call=call,
            customer_id=customer_id,
            policy=self._retry,
            describe=self._describe(account),
            logger=_log,
            passthrough=(httpx.codes.UNAUTHORIZED,),
        )

    @staticmethod
    def _limited(account: _Account, send: Callable[[], httpx.Response]) -> httpx.Response:
        """Bound the concurrent calls to one account: ShareFile curtails excessive usage."""
        with account.calls:
            return send()

    # -- tokens ------------------------------------------------------------------------------

    def _account(self, subdomain: str, customer_id: str) -> _Account:
        key = subdomain.lower()
        with self._accounts_lock:
            account = self._accounts.get(key)
            if account is None:
                try:
                    credentials = self._credentials.for_subdomain(key)
                except PermanentError as exc:
                    raise PermanentError(
                        exc.detail, customer_id=customer_id, call=CALL_TOKEN
                    ) from None
                account = _Account(key, credentials, self._max_calls)
                self._accounts[key] = account
            return account

    def _valid_token(self, account: _Account, customer_id: str) -> _Token:
        with account.lock:
            token = account.token
            if token is None or self._clock() >= token.expires_at:
                token = self._new_token(account, customer_id, previous=token)
            return token

    def _renewed_token(self, account: _Account, customer_id: str, *, rejected: _Token) -> _Token:
        with account.lock:
            token = account.token
            # Another thread may have renewed it while we waited for the lock: use that one.
            if token is not None and token is not rejected and self._clock() < token.expires_at:
                return token
            return self._new_token(account, customer_id, previous=token)

    def _new_token(self, account: _Account, customer_id: str, *, previous: _Token | None) -> _Token:
        """Refresh when we hold a refresh token, else (or if refreshing fails) the password grant.

        Only a PermanentError from the refresh grant falls back: a transient one would hit the
        same endpoint again with the password grant.
        """
        credentials = account.credentials
        if previous is not None and previous.refresh is not None:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": previous.refresh.get_secret_value(),
                "client_id": credentials.client_id,
                "client_secret": credentials.client_secret.get_secret_value(),
            }
            try:
                token = self._grant(account, form, customer_id)
            except PermanentError as exc:
                _log.info(
                    "%s for customer %s: refresh grant refused (HTTP %s %s); using password grant",
                    CALL_TOKEN,
                    customer_id,
                    exc.status,
                    exc.code or "",
                )
            else:
                account.token = token
                return token
        form = {
            "grant_type": "password",
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret.get_secret_value(),
            "username": credentials.username,
            "password": credentials.password.get_secret_value(),
        }
        token = self._grant(account, form, customer_id)
        account.token = token
        return token

    def _grant(self, account: _Account, form: dict[str, str], customer_id: str) -> _Token:
        """POST the form to the token endpoint; secrets travel in the body, never the URL."""
        url = self._token_url_template.format(subdomain=account.subdomain)
        issued_at = self._clock()
        response = send_with_retry(
            lambda: self._limited(account, lambda: self._http.post(url, data=form)),
            call=CALL_TOKEN,
            customer_id=customer_id,
            policy=self._retry,
            describe=self._describe(account),
            logger=_log,
        )
        body = parse_json(response, call=CALL_TOKEN, customer_id=customer_id)
        try:
            answer = _TokenAnswer.model_validate(body)
        except ValidationError as exc:
            fields = ", ".join(
                ".".join(str(p) for p in err["loc"]) or "body"
                for err in exc.errors(include_input=False, include_url=False)
            )
            raise malformed(
                f"token answer is missing or has invalid: {fields}",
                call=CALL_TOKEN,
                customer_id=customer_id,
            ) from None
        if not is_sendable_token(answer.access_token.get_secret_value()):
            # Sent, it would fail every call with an error that quotes it.
            raise malformed(
                "token answer's access_token is not a bearer token "
                "(whitespace, control or non-ASCII characters)",
                call=CALL_TOKEN,
                customer_id=customer_id,
            )
        lifetime = answer.expires_in if answer.expires_in and answer.expires_in > 0 else None
        lifetime = lifetime or DEFAULT_TOKEN_LIFETIME_S
        # A token shorter-lived than the margin would never be reused; keep it for half its life.
        margin = min(self._margin, lifetime / 2)
        _log.debug("%s for customer %s: token issued for %.0fs", CALL_TOKEN, customer_id, lifetime)
        return _Token(
            access=answer.access_token,
            refresh=answer.refresh_token,
            expires_at=issued_at + lifetime - margin,
            api_base=self._api_base(account.subdomain, answer, customer_id),
        )

    def _api_base(self, subdomain: str, answer: _TokenAnswer, customer_id: str) -> str:
        if answer.subdomain is not None and answer.subdomain.lower() != subdomain.lower():
            # The credentials logged into another account (a shared "*" entry, say): its
            # employees are not this customer's, and every user of this one would look absent.
            raise PermanentError(
                f"the credentials for subdomain {subdomain!r} log into the ShareFile account "
                f"{answer.subdomain!r}; check the customer's subdomain in Services Manager and "
                "the credentials file",
                customer_id=customer_id,
                call=CALL_TOKEN,
            )
        if self._api_url_template is not None:
            base = self._api_url_template.format(subdomain=subdomain)
        else:
            host_subdomain = subdomain
            control_plane = answer.apicp or DEFAULT_API_CONTROL_PLANE
            if not _SUBDOMAIN.match(host_subdomain) or not _HOST_SUFFIX.match(control_plane):
                raise malformed(
                    "token answer names an invalid API host",
                    call=CALL_TOKEN,
                    customer_id=customer_id,
                )
            base = f"https://{host_subdomain}.{control_plane}/sf/v3/"
        return base if base.endswith("/") else base + "/"

    def _describe(self, account: _Account) -> Callable[[httpx.Response], tuple[str | None, str]]:
        """ShareFile errors: {"code", "message": {"value"}}; OAuth errors: {"error", ...}."""

        def describe(response: httpx.Response) -> tuple[str | None, str]:
            try:
                body = response.json()
            except ValueError:
                body = None
            code: str | None = None
            message: str | None = None
            if isinstance(body, dict):
                raw_message = body.get("message")
                if isinstance(raw_message, dict):
                    raw_message = raw_message.get("value")
                if isinstance(body.get("code"), str):
                    code = body["code"]
                if isinstance(raw_message, str):
                    message = raw_message
                if message is None and isinstance(body.get("error"), str):
                    code = code or body["error"]
                    description = body.get("error_description")
                    message = description if isinstance(description, str) else body["error"]
            secrets = account.secret_values()
            text = server_text(message, secrets) if message else body_text(response, secrets)
            return (server_text(code, secrets) if code else None), text

        return describe


def _same_origin(url: str, base: str) -> bool:
    one, other = httpx.URL(url), httpx.URL(base)
    return (one.scheme, one.host.lower(), one.port) == (
        other.scheme,
        other.host.lower(),
        other.port,
    )


def _same_path(url: str, feed: str) -> bool:
    """Whether `url` is a page of `feed`: the same path (only the query may differ)."""
    return httpx.URL(url).path.rstrip("/").lower() == httpx.URL(feed).path.rstrip("/").lower()


def _either(body: dict[str, Any], v3: str, v4: str) -> Any:
    """An OData annotation in either spelling: a null in one does not hide the other's value."""
    value = body.get(v3)
    return body.get(v4) if value is None else value
