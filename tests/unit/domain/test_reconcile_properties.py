"""Properties of reconcile that must hold for any two user sets, checked with hypothesis.

The strategy draws small customers from a handful of addresses written in many ways (case,
decomposed accents, full-width letters, padding), so that collisions, conflicts and unusable
addresses are common rather than rare; with every SM state, disabled users on both sides, client
users, and guards tight enough to hold often.
"""

from __future__ import annotations

import dataclasses
import random
import unicodedata
from collections import Counter
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.matching import normalise_email, sm_user_key
from domain.plan import Plan
from domain.policy import DisabledEmployees, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import SharefileState, SharefileUser, SmUser

FAST = settings(max_examples=200, deadline=None)

BASES = (
    "ann@acme.example",
    "bob@acme.example",
    "josé@acme.example",
    "zoë@acme.example",
    "cy@b.example",
)
UNUSABLE = (None, "", "no-at-sign", "a@b@c", "x@", "in side@acme.example")


def full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


VARIANTS: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    str.upper,
    str.title,
    lambda s: unicodedata.normalize("NFD", s),
    full_width,
    lambda s: f"  {s}\t",
)


@st.composite
def addresses(draw: st.DrawFn) -> str | None:
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from(UNUSABLE))
    return draw(st.sampled_from(VARIANTS))(draw(st.sampled_from(BASES)))


@st.composite
def sm_users(draw: st.DrawFn) -> list[SmUser]:
    count = draw(st.integers(0, 8))
    users = [
        SmUser(
            id=f"u-{n}",
            state=draw(st.sampled_from(SharefileState)),
            email=draw(addresses()),
            username=draw(st.none() | addresses()),
            enabled=draw(st.sampled_from((True, True, False))),
        )
        for n in range(count)
    ]
    # A cursor that replayed a page lists some users again: as they were, in another state, or
    # under another key. (Not drawn: the same key spelt another way, or another `enabled`. The
    # plan then depends on which listing came first, but only in what it reports of the user or
    # in a provision; see the note in reconcile.)
    for listed in draw(st.lists(st.sampled_from(users), max_size=2)) if users else []:
        key = sm_user_key(listed)
        other_key = addresses().filter(
            lambda e, u=listed, k=key: sm_user_key(dataclasses.replace(u, email=e)) != k
        )
        users.append(
            listed
            if draw(st.booleans())
            else dataclasses.replace(
                listed,
                state=draw(st.sampled_from(SharefileState)),
                email=draw(st.just(listed.email) | other_key),
            )
        )
    return users


@st.composite
def sharefile_users(draw: st.DrawFn) -> list[SharefileUser]:
    count = draw(st.integers(0, 8))
    users = [
        SharefileUser(
            id=f"sf-{n}",
            email=draw(addresses()),
            is_disabled=draw(st.booleans()),
            is_employee=draw(st.sampled_from((True, True, True, False))),
        )
        for n in range(count)
    ]
    # Pages read while the account changed list some users again: as they were, or changed.
    for listed in draw(st.lists(st.sampled_from(users), max_size=3)) if users else []:
        users.append(
            listed
            if draw(st.booleans())
            else SharefileUser(
                id=listed.id,
                email=draw(st.sampled_from((listed.email,)) | addresses()),
                is_disabled=draw(st.booleans()),
                is_employee=draw(st.sampled_from((listed.is_employee, True, False))),
            )
        )
    return users


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    guard = draw(
        st.just(SafetyGuard())
        | st.builds(
            SafetyGuard,
            max_deprovision=st.integers(0, 6),
            max_deprovision_ratio=st.sampled_from((0.0, 0.2, 0.5, 1.0)),
            ratio_floor=st.integers(0, 6),
        )
    )
    return Policy(disabled_employees=draw(st.sampled_from(DisabledEmployees)), guard=guard)


Customer = tuple[list[SmUser], list[SharefileUser], Policy, int | None]


@st.composite
def customers(draw: st.DrawFn) -> Customer:
    sm = draw(sm_users())
    sf = draw(sharefile_users())
    employees = sum(u.is_employee for u in sf)
    declared = draw(st.none() | st.integers(max(employees - 1, 0), employees + 2))
    return sm, sf, draw(policies()), declared


def plan_of(customer: Customer) -> Plan:
    sm, sf, policy, declared = customer
    return reconcile(sm, sf, policy, customer_id="cust-1", sharefile_declared=declared)


def applied(plan: Plan, sm: list[SmUser]) -> list[SmUser]:
    """Services Manager after carrying out the plan's requests (and nothing that was held)."""
    new_state = {i.user_id: SharefileState.PROVISIONED for i in plan.provision}
    new_state |= {i.user_id: SharefileState.NOT_PROVISIONED for i in plan.deprovision}
    return [dataclasses.replace(u, state=new_state.get(u.id, u.state)) for u in sm]


def ids(items: tuple[object, ...], attr: str) -> set[str]:
    return {value for item in items if (value := getattr(item, attr)) is not None}


@FAST
@given(customers())
def test_reconciling_after_applying_a_plan_leaves_only_the_held_removals(
    customer: Customer,
) -> None:
    """After the requests are carried out, a second run asks for nothing new.

    Precisely: it provisions nobody; what it would remove (sent or held) is exactly what the first
    run held; conflicts, pending, skipped and unmatched are unchanged; and every user acted on is
    now in sync.
    """
    sm, sf, policy, declared = customer
    first = plan_of(customer)

    second = plan_of((applied(first, sm), sf, policy, declared))

    assert second.provision == ()
    assert ids(second.deprovision + second.held, "user_id") == ids(first.held, "user_id")
    assert second.conflicts == first.conflicts
    assert second.pending == first.pending
    assert second.skipped == first.skipped
    assert second.unmatched == first.unmatched
    assert second.in_sync == first.in_sync + len(first.actions)


@FAST
@given(customers(), st.randoms(use_true_random=False))
def test_reconcile_is_deterministic_under_input_permutation(
    customer: Customer, rnd: random.Random
) -> None:
    sm, sf, policy, declared = customer
    expected = plan_of(customer)
    sm, sf = list(sm), list(sf)
    rnd.shuffle(sm)
    rnd.shuffle(sf)

    shuffled = plan_of((sm, sf, policy, declared))

    assert shuffled == expected
    assert shuffled.plan_id == expected.plan_id


@FAST
@given(customers())
def test_no_user_is_in_two_categories(customer: Customer) -> None:
    plan = plan_of(customer)
    sm_ids: Counter[str] = Counter()
    sf_ids: Counter[str] = Counter()
    for category in (plan.provision, plan.deprovision, plan.held, plan.pending, plan.skipped):
        sm_ids.update(ids(category, "user_id"))
        sf_ids.update(ids(category, "sharefile_user_id"))
    # One category: a ShareFile user listed under two addresses is in the conflict of each; but
    # nobody twice in one conflict.
    for conflict in plan.conflicts:
        assert len(set(conflict.sm_user_ids)) == len(conflict.sm_user_ids), conflict
        assert len(set(conflict.sharefile_user_ids)) == len(conflict.sharefile_user_ids), conflict
    sm_ids.update({i for conflict in plan.conflicts for i in conflict.sm_user_ids})
    sf_ids.update({i for conflict in plan.conflicts for i in conflict.sharefile_user_ids})
    sf_ids.update(ids(plan.unmatched, "sharefile_user_id"))
    # ...and nobody twice within one category either.
    every_item = plan.provision + plan.deprovision + plan.held
    assert len({i.user_id for i in every_item}) == len(every_item)

    assert [i for i, n in sm_ids.items() if n > 1] == []
    assert [i for i, n in sf_ids.items() if n > 1] == []


@FAST
@given(customers())
def test_no_user_with_a_matching_active_employee_is_ever_deprovisioned(customer: Customer) -> None:
    sm, sf, policy, _ = customer
    keep_disabled = policy.disabled_employees is DisabledEmployees.KEEP
    active_keys = {
        normalise_email(u.email)
        for u in sf
        if u.is_employee and (keep_disabled or not u.is_disabled)
    } - {None}
    plan = plan_of(customer)

    for item in plan.deprovision + plan.held:
        for user in (u for u in sm if u.id == item.user_id):  # every listing of the user
            key = normalise_email(user.email) or normalise_email(user.username)
            assert key is not None
            assert key not in active_keys
            assert user.state is SharefileState.PROVISIONED


WIDE_OPEN = SafetyGuard(max_deprovision=10_000, max_deprovision_ratio=1.0)


@FAST
@given(customers())
def test_a_held_plan_sends_no_removal_and_keeps_its_provisions(customer: Customer) -> None:
    sm, sf, policy, _ = customer
    plan = plan_of(customer)
    # Only the thresholds can be opened wide; an empty or short feed still holds.
    open_policy = policy.model_copy(update={"guard": WIDE_OPEN})
    unguarded = plan_of((sm, sf, open_policy, None))

    assert plan.provision == unguarded.provision
    assert plan.plan_id == unguarded.plan_id
    assert plan.deprovision + plan.held == unguarded.deprovision + unguarded.held
    if plan.hold_reasons:
        assert plan.deprovision == ()
        assert plan.held != ()
        assert plan.approved is False
    else:
        assert plan.held == ()


@FAST
@given(customers())
def test_approving_a_held_plan_releases_exactly_its_held_removals(customer: Customer) -> None:
    sm, sf, policy, declared = customer
    held = plan_of(customer)
    approval = policy.model_copy(update={"approved_plan_id": held.plan_id})

    released = plan_of((sm, sf, approval, declared))

    if held.is_held:
        assert released.deprovision == held.held
        assert released.approved is True
        assert released.held == ()
    else:
        assert released == held
