"""List pages read in one pass (pydantic-core) must read exactly as item by item would.

Both clients first try to parse and validate a whole users page at once (`validated_page`) and
fall back to the item-by-item path when it does not validate. These tests hold the clients to
the item-by-item meaning for any page: the same records when every item is valid, the same
PermanentError when one is not, and the feed (never the item) deciding who is an employee.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import adapters.services_manager as services_manager
import adapters.sharefile as sharefile
from adapters.http import parse_json, validated_page
from domain.errors import PermanentError
from domain.records import SHAREFILE_USER, SM_USER, SharefileState, SharefileUser, SmUser
from tests.unit.adapters.test_services_manager_client import BASE, TOKEN
from tests.unit.adapters.test_services_manager_client import no_wait_policy as sm_policy
from tests.unit.adapters.test_sharefile_client import ACME, FakeShareFile, employee, make_client

# JSON values of every kind, including the ones lax validation turns into bools or refuses.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.0, 0.5, "", "true", "false", "yes", "0", "1", "no", "Ann", "é"]),
    st.text(max_size=6),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)
SF_KEYS = [
    "Id",
    "id",
    "Email",
    "email",
    "FirstName",
    "LastName",
    "IsDisabled",
    "is_employee",
    "odata.type",
    "Name",
]
SM_KEYS = ["id", "state", "username", "email", "display_name", "enabled", "extra"]


def sf_items() -> st.SearchStrategy[list[dict[str, Any]]]:
    item = st.fixed_dictionaries(
        {"Id": st.one_of(st.text(min_size=1, max_size=4), SCALARS)},
        optional={key: VALUES for key in SF_KEYS if key != "Id"},
    )
    return st.lists(item, max_size=4)


def sm_items() -> st.SearchStrategy[list[dict[str, Any]]]:
    state = st.one_of(st.sampled_from(["provisioned", "not_provisioned", "failed", "x"]), SCALARS)
    item = st.fixed_dictionaries(
        {
            "id": st.one_of(st.text(min_size=1, max_size=4), SCALARS),
            "sharefile": st.one_of(st.fixed_dictionaries({"state": state}), SCALARS),
        },
        optional={key: VALUES for key in SM_KEYS if key != "id"},
    )
    return st.lists(item, max_size=4)


def item_by_item(
    adapter: Any, items: list[dict[str, Any]], employees: bool | None = None
) -> list[Any] | None:
    """What the item-by-item path reads from these items, or None when one of them is refused.

    For a ShareFile feed (`employees` given) the feed's answer replaces any is_employee key.
    """
    records = []
    for item in items:
        raw = json.loads(json.dumps(item))
        context = None
        if employees is not None:
            raw["is_employee"] = employees
            context = {"is_employee": employees}
        try:
            records.append(adapter.validate_python(raw, context=context))
        except ValidationError:
            return None
    return records


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sf_items(), employees=st.booleans())
def test_a_sharefile_page_reads_as_its_items_would_one_by_one(
    items: list[dict[str, Any]], employees: bool
) -> None:
    fake = FakeShareFile(employees={"acme": items}, clients={"acme": items})
    client = make_client(fake)
    feed = client.employees(ACME) if employees else client.clients(ACME)
    expected = item_by_item(SHAREFILE_USER, items, employees)
    if expected is None:
        with pytest.raises(PermanentError, match="malformed response"):
            list(feed)
    else:
        assert list(feed) == expected
        assert all(user.is_employee is employees for user in expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sf_items(), data=st.data())
def test_a_second_read_yields_what_a_first_would_less_the_known_users(
    items: list[dict[str, Any]], data: st.DataObject
) -> None:
    # A second read parses only the ids of pages of known users: it must read every id as the
    # record does, or a present employee could look absent.
    ids = {v for item in items for v in (item.get("Id"), item.get("id")) if isinstance(v, str)}
    known = data.draw(st.sets(st.sampled_from(sorted(ids | {"other"}))))
    client = make_client(FakeShareFile(employees={"acme": items}))
    expected = item_by_item(SHAREFILE_USER, items, True)
    if expected is not None:
        assert list(client.employees(ACME, known=known)) == [
            user for user in expected if user.id not in known
        ]
        return
    try:  # a first read fails: a second one too, unless it had only known users to read
        got = list(client.employees(ACME, known=known))
    except PermanentError:
        return
    assert got == []


@pytest.mark.parametrize(
    ("item", "known", "yielded"),
    [
        ({"Id": "a", "id": "b"}, {"b"}, ["a"]),  # "Id" first, as the record reads it
        ({"Id": "a", "id": "b"}, {"a"}, []),
        ({"id": "b"}, {"b"}, []),
        ({"Id": "a "}, {"a"}, ["a "]),  # not trimmed by either
    ],
)
def test_a_second_read_takes_each_id_as_the_record_does(
    item: dict[str, Any], known: set[str], yielded: list[str]
) -> None:
    client = make_client(FakeShareFile(employees={"acme": [item]}))
    assert [user.id for user in client.employees(ACME, known=known)] == yielded


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sm_items())
def test_a_services_manager_page_reads_as_its_items_would_one_by_one(
    items: list[dict[str, Any]],
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": items, "next_cursor": None})

    client = services_manager.ServicesManagerClient(
        BASE, TOKEN, http=httpx.Client(transport=httpx.MockTransport(answer)), retry=sm_policy()
    )
    expected = item_by_item(SM_USER, items)
    if expected is None:
        with pytest.raises(PermanentError, match="malformed response: user #"):
            list(client.list_users("cust-0001"))
    else:
        assert list(client.list_users("cust-0001")) == expected


def test_the_feed_decides_who_is_an_employee_whatever_the_item_says() -> None:
    said_not = [
        employee(1, is_employee=False),
        employee(2, is_employee="no"),
        employee(4, is_employee={"x": 1}),
    ]
    said_so = [employee(3, is_employee=True)]
    fake = FakeShareFile(employees={"acme": said_not}, clients={"acme": said_so})
    client = make_client(fake)
    assert [u.is_employee for u in client.employees(ACME)] == [True, True, True]
    assert [u.is_employee for u in client.clients(ACME)] == [False]


def test_a_record_built_without_a_feed_keeps_the_value_given() -> None:
    assert SharefileUser(id="x", is_employee=False).is_employee is False
    assert SHAREFILE_USER.validate_python({"Id": "x", "is_employee": False}).is_employee is False


class CountingAdapter:
    """Wraps a TypeAdapter to count item-by-item validations."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.calls = 0

    def validate_python(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.adapter.validate_python(*args, **kwargs)


def test_valid_pages_take_the_one_pass_path(monkeypatch: pytest.MonkeyPatch) -> None:
    sf_counter, sm_counter = CountingAdapter(SHAREFILE_USER), CountingAdapter(SM_USER)
    monkeypatch.setattr(sharefile, "SHAREFILE_USER", sf_counter)
    monkeypatch.setattr(services_manager, "SM_USER", sm_counter)
    fake = FakeShareFile(employees={"acme": [employee(n) for n in range(7)]}, page_size=3)
    assert len(list(make_client(fake).employees(ACME))) == 7
    sm_user = {"id": "u-1", "sharefile": {"state": "provisioned"}, "email": "a@b.example"}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [sm_user] * 5, "next_cursor": None})

    sm = services_manager.ServicesManagerClient(
        BASE, TOKEN, http=httpx.Client(transport=httpx.MockTransport(answer)), retry=sm_policy()
    )
    assert (
        list(sm.list_users("cust-0001"))
        == [SmUser(id="u-1", state=SharefileState.PROVISIONED, email="a@b.example")] * 5
    )
    assert (sf_counter.calls, sm_counter.calls) == (0, 0)


def test_a_page_with_one_bad_item_yields_the_items_before_it_then_names_it() -> None:
    items: list[dict[str, Any]] = [employee(0), employee(1), {"Email": "no-id@acme.example"}]
    feed = make_client(FakeShareFile(employees={"acme": items})).employees(ACME)
    stream = iter(feed)
    assert [next(stream).id, next(stream).id] == ["a1b2c3d4-0000", "a1b2c3d4-0001"]
    with pytest.raises(PermanentError, match=r"item #2 \(page 1\)"):
        next(stream)


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (codecs.BOM_UTF8 + b'{"a": 1}', {"a": 1}),
        ('{"a": "\u00e9"}'.encode("utf-16"), {"a": "\u00e9"}),
        (b'{"a": "\\udc80"}', {"a": "\udc80"}),
        (b'{"a": NaN, "a": 2}', {"a": 2}),
    ],
)
def test_parse_json_still_reads_what_json_loads_reads(body: bytes, value: object) -> None:
    assert parse_json(httpx.Response(200, content=body), call="GET x", customer_id=None) == value


def test_validated_page_is_none_for_anything_that_does_not_validate() -> None:
    adapter = sharefile._ODATA_PAGE
    for body in (b"not json", b"[]", b'{"value": [{"Email": "no id"}]}', codecs.BOM_UTF8 + b"{}"):
        assert validated_page(httpx.Response(200, content=body), adapter) is None
