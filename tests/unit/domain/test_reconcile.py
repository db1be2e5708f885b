"""The reconcile rules of DESIGN.md, one behaviour per test, plus the records reconcile reads."""

from __future__ import annotations

import dataclasses
import gc
import random
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from domain.plan import Action, Plan, PlanItem, Rule, SkipReason
from domain.policy import DisabledEmployees, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import SHAREFILE_USER, SM_USER, SharefileState, SharefileUser, SmUser

NOT_PROVISIONED = SharefileState.NOT_PROVISIONED
PROVISIONED = SharefileState.PROVISIONED
PROVISIONING = SharefileState.PROVISIONING
DEPROVISIONING = SharefileState.DEPROVISIONING
FAILED = SharefileState.FAILED
STATES = [PROVISIONED, NOT_PROVISIONED, PROVISIONING, FAILED]

# Never in the way of the rules under test; the guard has its own tests.
NO_GUARD = SafetyGuard(max_deprovision=10_000, max_deprovision_ratio=1.0)


def sm(
    user_id: str,
    email: str | None,
    state: SharefileState = NOT_PROVISIONED,
    *,
    username: str | None = None,
    enabled: bool = True,
) -> SmUser:
    return SmUser(id=user_id, state=state, email=email, username=username, enabled=enabled)


def sf(
    user_id: str,
    email: str | None,
    *,
    disabled: bool = False,
    employee: bool = True,
) -> SharefileUser:
    return SharefileUser(id=user_id, email=email, is_disabled=disabled, is_employee=employee)


def plan_for(
    sm_users: list[SmUser],
    sharefile_users: list[SharefileUser],
    *,
    disabled_employees: DisabledEmployees = DisabledEmployees.KEEP,
) -> Plan:
    policy = Policy(disabled_employees=disabled_employees, guard=NO_GUARD)
    return reconcile(sm_users, sharefile_users, policy, customer_id="cust-1")


def only(items: tuple[PlanItem, ...]) -> PlanItem:
    assert len(items) == 1, items
    return items[0]


def assert_no_action(plan: Plan) -> None:
    assert plan.provision == ()
    assert plan.deprovision == ()
    assert plan.held == ()


# --- provision ------------------------------------------------------------------------------------


def test_active_employee_without_service_is_provisioned() -> None:
    plan = plan_for([sm("u-1", "ann@acme.example")], [sf("sf-1", "Ann@Acme.example")])

    item = only(plan.provision)
    assert item.action is Action.PROVISION
    assert item.rule is Rule.EMPLOYEE_WITHOUT_SERVICE
    assert item.user_id == "u-1"
    assert plan.deprovision == ()


def test_employee_whose_last_request_failed_is_provisioned_again() -> None:
    plan = plan_for([sm("u-1", "ann@acme.example", FAILED)], [sf("sf-1", "ann@acme.example")])

    item = only(plan.provision)
    assert item.rule is Rule.RETRY_AFTER_FAILURE
    assert item.sm_state is FAILED


def test_plan_items_carry_their_evidence() -> None:
    plan = plan_for(
        [sm("u-1", "Ann@Acme.example"), sm("u-2", "bob@acme.example", PROVISIONED)],
        [sf("sf-1", "ann@acme.example")],
    )

    provision = only(plan.provision)
    assert provision.match_key == "ann@acme.example"
    assert provision.sharefile_user_id == "sf-1"
    assert provision.sm_state is NOT_PROVISIONED
    assert provision.email == "Ann@Acme.example"
    deprovision = only(plan.deprovision)
    assert deprovision.match_key == "bob@acme.example"
    assert deprovision.sharefile_user_id is None
    assert deprovision.sm_state is PROVISIONED


def test_employee_already_provisioned_is_in_sync() -> None:
    plan = plan_for([sm("u-1", "ann@acme.example", PROVISIONED)], [sf("sf-1", "ann@acme.example")])

    assert_no_action(plan)
    assert plan.in_sync == 1


def test_disabled_sm_user_is_never_provisioned_but_reported_as_skipped() -> None:
    plan = plan_for(
        [
            sm("u-1", "ann@acme.example", enabled=False),
            sm("u-2", "bob@acme.example", FAILED, enabled=False),
        ],
        [sf("sf-1", "ann@acme.example"), sf("sf-2", "bob@acme.example")],
    )

    assert_no_action(plan)
    assert [(s.reason, s.user_id, s.sharefile_user_id) for s in plan.skipped] == [
        (SkipReason.SM_USER_DISABLED, "u-1", "sf-1"),
        (SkipReason.SM_USER_DISABLED, "u-2", "sf-2"),
    ]


# --- deprovision ----------------------------------------------------------------------------------


def test_provisioned_user_absent_from_sharefile_is_deprovisioned() -> None:
    plan = plan_for([sm("u-1", "gone@acme.example", PROVISIONED)], [sf("sf-9", "x@acme.example")])

    item = only(plan.deprovision)
    assert item.action is Action.DEPROVISION
    assert item.rule is Rule.ABSENT_FROM_SHAREFILE
    assert item.user_id == "u-1"


def test_user_moved_to_client_is_deprovisioned_as_absent_from_the_employee_feed() -> None:
    # The Employees feed no longer lists a user who became a client user.
    before = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)], [sf("sf-1", "ann@acme.example")]
    )
    after = plan_for([sm("u-1", "ann@acme.example", PROVISIONED)], [sf("sf-2", "x@acme.example")])

    assert before.deprovision == ()
    assert only(after.deprovision).rule is Rule.ABSENT_FROM_SHAREFILE


def test_user_passed_as_client_is_deprovisioned_with_the_client_rule() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [sf("sf-1", "ann@acme.example", employee=False), sf("sf-2", "bob@acme.example")],
    )

    item = only(plan.deprovision)
    assert item.rule is Rule.SHAREFILE_USER_IS_CLIENT
    assert item.sharefile_user_id == "sf-1"


def test_client_user_is_never_provisioned_nor_reported_unmatched() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example")],
        [
            sf("sf-1", "ann@acme.example", employee=False),
            sf("sf-2", "cy@acme.example", employee=False),
        ],
    )

    assert_no_action(plan)
    assert plan.unmatched == ()
    assert plan.sharefile_employees == 0


def test_disabled_employee_is_kept_by_default() -> None:
    plan = reconcile(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [sf("sf-1", "ann@acme.example", disabled=True)],
    )

    assert Policy().disabled_employees is DisabledEmployees.KEEP
    assert_no_action(plan)
    assert plan.in_sync == 1


def test_disabled_employee_without_service_is_provisioned_under_keep() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example")], [sf("sf-1", "ann@acme.example", disabled=True)]
    )

    assert only(plan.provision).rule is Rule.EMPLOYEE_WITHOUT_SERVICE


def test_disabled_employee_is_deprovisioned_under_the_deprovision_policy() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [sf("sf-1", "ann@acme.example", disabled=True)],
        disabled_employees=DisabledEmployees.DEPROVISION,
    )

    item = only(plan.deprovision)
    assert item.rule is Rule.EMPLOYEE_DISABLED
    assert item.sharefile_user_id == "sf-1"


def test_disabled_employee_is_not_provisioned_under_the_deprovision_policy() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example")],
        [sf("sf-1", "ann@acme.example", disabled=True)],
        disabled_employees=DisabledEmployees.DEPROVISION,
    )

    assert_no_action(plan)


def test_failed_user_without_a_matching_employee_is_skipped_not_retried() -> None:
    # The failed request may have been a removal; asking again blindly could go either way.
    plan = plan_for([sm("u-1", "ann@acme.example", FAILED)], [sf("sf-2", "bob@acme.example")])

    assert_no_action(plan)
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.PREVIOUS_REQUEST_FAILED, "u-1")
    ]


# --- in flight ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [PROVISIONING, DEPROVISIONING])
@pytest.mark.parametrize("in_sharefile", [True, False])
def test_user_with_a_request_in_flight_is_pending_never_an_action(
    state: SharefileState, in_sharefile: bool
) -> None:
    employees = [sf("sf-1", "ann@acme.example")] if in_sharefile else [sf("sf-2", "b@acme.example")]
    plan = plan_for([sm("u-1", "ann@acme.example", state)], employees)

    assert_no_action(plan)
    [pending] = plan.pending
    assert pending.user_id == "u-1"
    assert pending.state is state
    assert pending.sharefile_user_id == ("sf-1" if in_sharefile else None)
    assert all(u.sharefile_user_id != "sf-1" for u in plan.unmatched)


# --- conflicts ------------------------------------------------------------------------------------


def test_two_sm_users_with_one_address_are_a_conflict_and_left_alone() -> None:
    plan = plan_for(
        [
            sm("u-2", "Ann@Acme.example", PROVISIONED),
            sm("u-1", "ann@acme.example"),
            sm("u-3", "bob@acme.example"),
        ],
        [sf("sf-1", "ann@acme.example"), sf("sf-3", "bob@acme.example")],
    )

    [conflict] = plan.conflicts
    assert conflict.match_key == "ann@acme.example"
    assert conflict.sm_user_ids == ("u-1", "u-2")
    assert conflict.sharefile_user_ids == ("sf-1",)
    assert [item.user_id for item in plan.actions] == ["u-3"]
    assert plan.unmatched == ()


def test_two_sharefile_users_with_one_address_are_a_conflict_and_left_alone() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [sf("sf-2", "ANN@acme.example"), sf("sf-1", " ann@acme.example")],
    )

    [conflict] = plan.conflicts
    assert conflict.sm_user_ids == ("u-1",)
    assert conflict.sharefile_user_ids == ("sf-1", "sf-2")
    assert_no_action(plan)


def test_duplicate_sharefile_address_without_sm_user_is_a_conflict_not_unmatched() -> None:
    plan = plan_for([], [sf("sf-1", "ann@acme.example"), sf("sf-2", "Ann@acme.example")])

    assert [c.sharefile_user_ids for c in plan.conflicts] == [("sf-1", "sf-2")]
    assert plan.conflicts[0].sm_user_ids == ()
    assert plan.unmatched == ()


def test_email_of_one_sm_user_colliding_with_username_of_another_is_a_conflict() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example"), sm("u-2", None, username="Ann@Acme.example")],
        [sf("sf-1", "ann@acme.example")],
    )

    assert [c.sm_user_ids for c in plan.conflicts] == [("u-1", "u-2")]
    assert_no_action(plan)


@pytest.mark.parametrize(
    ("first", "sharefile_users"),
    [
        pytest.param(sm("u-1", "ann@acme.example", PROVISIONED), ["ann"], id="in-sync"),
        pytest.param(sm("u-1", "ann@acme.example", PROVISIONED), [], id="deprovision"),
        pytest.param(sm("u-1", "ann@acme.example"), ["ann"], id="provision"),
        pytest.param(sm("u-1", "ann@acme.example", PROVISIONING), ["ann"], id="pending"),
        pytest.param(sm("u-1", "ann@acme.example", enabled=False), ["ann"], id="skipped"),
        pytest.param(sm("u-1", "ann@acme.example", FAILED), [], id="failed-skipped"),
        pytest.param(sm("u-1", "ann@acme.example"), [], id="not-entitled-in-sync"),
    ],
)
def test_a_later_sm_user_on_the_same_key_takes_back_the_first_users_outcome(
    first: SmUser, sharefile_users: list[str]
) -> None:
    # Services Manager's side is read once, in order: by the time the second user on a key
    # arrives, the first one already has an outcome, which the conflict must undo.
    plan = plan_for(
        [
            first,
            sm("u-0", "bob@acme.example", PROVISIONED),
            sm("u-2", "ANN@acme.example", PROVISIONED),
            sm("u-3", None, username="ann@ACME.example"),
        ],
        [sf("sf-1", f"{name}@acme.example") for name in sharefile_users]
        + [sf("sf-0", "bob@acme.example")],
    )

    assert [(c.match_key, c.sm_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-1", "u-2", "u-3"))
    ]
    assert_no_action(plan)
    assert plan.pending == ()
    assert plan.skipped == ()
    assert plan.unmatched == ()
    assert plan.in_sync == 1  # bob alone
    assert plan.sm_users == 4


def test_sm_users_on_a_sharefile_conflict_are_listed_once_and_never_acted_on() -> None:
    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED), sm("u-2", "Ann@acme.example")],
        [sf("sf-1", "ann@acme.example"), sf("sf-2", "ANN@acme.example")],
    )

    [conflict] = plan.conflicts
    assert conflict.sm_user_ids == ("u-1", "u-2")
    assert conflict.sharefile_user_ids == ("sf-1", "sf-2")
    assert_no_action(plan)
    assert plan.in_sync == 0


# --- users that cannot be matched -----------------------------------------------------------------


def test_employee_without_email_is_skipped_not_silently_dropped() -> None:
    plan = plan_for(
        [], [sf("sf-1", None), sf("sf-2", "not an address"), sf("sf-3", "c@acme.example")]
    )

    skipped = [(s.reason, s.sharefile_user_id, s.email) for s in plan.skipped]
    assert skipped == [
        (SkipReason.SHAREFILE_USER_WITHOUT_EMAIL, "sf-1", None),
        (SkipReason.SHAREFILE_USER_WITHOUT_EMAIL, "sf-2", "not an address"),
    ]
    assert [u.sharefile_user_id for u in plan.unmatched] == ["sf-3"]
    assert plan.sharefile_employees == 3


@pytest.mark.parametrize("state", [PROVISIONED, FAILED, PROVISIONING, DEPROVISIONING])
def test_sm_user_with_service_but_without_usable_email_is_skipped_never_deprovisioned(
    state: SharefileState,
) -> None:
    plan = plan_for(
        [sm("u-1", None, state), sm("u-2", "a@b@c", state, username="ann")],
        [sf("sf-9", "z@acme.example")],
    )

    assert_no_action(plan)
    assert plan.pending == ()
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.SM_USER_WITHOUT_EMAIL, "u-1"),
        (SkipReason.SM_USER_WITHOUT_EMAIL, "u-2"),
    ]


def test_sm_username_matches_when_email_is_missing() -> None:
    plan = plan_for(
        [sm("u-1", None, username="Ann@Acme.example")], [sf("sf-1", "ann@acme.example")]
    )

    item = only(plan.provision)
    assert item.match_key == "ann@acme.example"
    assert item.email == "Ann@Acme.example"


def test_sm_username_does_not_match_when_email_is_usable_but_keeps_the_user_from_removal() -> None:
    # The key is the e-mail; but a provisioned user whose e-mail matches nobody while their
    # username is an employee's address most likely has a stale e-mail: skipped, not removed.
    plan = plan_for(
        [sm("u-1", "other@acme.example", PROVISIONED, username="Ann@acme.example")],
        [sf("sf-1", "ann@acme.example")],
    )

    assert plan.deprovision == () and plan.held == ()
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.SM_USERNAME_IS_AN_EMPLOYEE, "u-1")
    ]
    assert [u.sharefile_user_id for u in plan.unmatched] == ["sf-1"]


def test_a_username_that_is_a_client_users_address_does_not_keep_the_user() -> None:
    plan = plan_for(
        [
            sm("u-1", "other@acme.example", PROVISIONED, username="ann@acme.example"),
            sm("u-2", "bob@acme.example", PROVISIONED),
        ],
        [sf("sf-1", "ann@acme.example", employee=False), sf("sf-2", "bob@acme.example")],
    )

    assert only(plan.deprovision).rule is Rule.ABSENT_FROM_SHAREFILE


@pytest.mark.parametrize("client_first", [False, True])
def test_a_username_shared_by_an_employee_and_a_client_keeps_the_user_in_either_order(
    client_first: bool,
) -> None:
    # ShareFile lists the username's address twice (a conflict): once as an employee. Whichever
    # the feed gives first, the user is skipped, not removed: the same inputs, the same plan.
    employee, client = (
        sf("sf-2", "bob@acme.example"),
        sf("sf-3", "bob@acme.example", employee=False),
    )
    plan = plan_for(
        [sm("u-3", "ann@acme.example", PROVISIONED, username="bob@acme.example")],
        [client, employee] if client_first else [employee, client],
    )

    assert plan.deprovision == () and plan.held == ()
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.SM_USERNAME_IS_AN_EMPLOYEE, "u-3")
    ]


@pytest.mark.parametrize("new_first", [False, True])
def test_a_sharefile_user_listed_under_two_addresses_is_a_conflict_on_both(
    new_first: bool,
) -> None:
    # sf-1 changed address while the feed's pages were read and was listed under both. Which is
    # current is unknown: its old-address SM user is not provisioned and its new-address one not
    # removed (a held removal an operator might approve), whichever listing came first.
    old, new = sf("sf-1", "ann@acme.example"), sf("sf-1", "ann.new@acme.example")
    plan = plan_for(
        [sm("u-1", "ann@acme.example"), sm("u-2", "Ann.New@acme.example", PROVISIONED)],
        [new, old] if new_first else [old, new],
    )

    assert_no_action(plan)
    assert [(c.match_key, c.sm_user_ids, c.sharefile_user_ids) for c in plan.conflicts] == [
        ("ann.new@acme.example", ("u-2",), ("sf-1",)),
        ("ann@acme.example", ("u-1",), ("sf-1",)),
    ]
    assert plan.unmatched == () and plan.sharefile_employees == 1


@pytest.mark.parametrize("client_first", [False, True])
def test_a_sharefile_user_listed_as_employee_and_client_is_a_conflict(client_first: bool) -> None:
    employee = sf("sf-1", "ann@acme.example")
    client = sf("sf-1", "ann@acme.example", employee=False)

    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [client, employee] if client_first else [employee, client],
    )

    assert_no_action(plan)
    assert [(c.match_key, c.sm_user_ids, c.sharefile_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-1",), ("sf-1",))
    ]
    assert plan.sharefile_employees == 1


@pytest.mark.parametrize("disabled_first", [False, True])
@pytest.mark.parametrize("disabled_employees", list(DisabledEmployees))
def test_a_sharefile_user_listed_as_disabled_and_not_is_a_conflict(
    disabled_first: bool, disabled_employees: DisabledEmployees
) -> None:
    active, disabled = sf("sf-1", "ann@acme.example"), sf("sf-1", "ann@acme.example", disabled=True)
    plan = plan_for(
        [sm("u-1", "ann@acme.example", PROVISIONED)],
        [disabled, active] if disabled_first else [active, disabled],
        disabled_employees=disabled_employees,
    )

    assert_no_action(plan)
    assert [(c.match_key, c.sm_user_ids, c.sharefile_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-1",), ("sf-1",))
    ]


def test_a_sharefile_user_listed_without_an_address_and_with_one_is_only_a_conflict() -> None:
    # One listing has no usable address: reported once (a conflict on the address it does give),
    # and still counted as an employee without one for the guard.
    plan = reconcile(
        [sm("u-1", "ann@acme.example", PROVISIONED), sm("u-2", "gone@acme.example", PROVISIONED)],
        [sf("sf-0", None), sf("sf-0", "ann@acme.example", employee=False)],
        Policy(guard=NO_GUARD),
        customer_id="cust-1",
    )

    assert [(c.match_key, c.sm_user_ids, c.sharefile_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-1",), ("sf-0",))
    ]
    assert plan.skipped == () and plan.sharefile_employees == 1
    assert plan.deprovision == () and [i.user_id for i in plan.held] == ["u-2"]


@pytest.mark.parametrize("client_first", [False, True])
def test_a_username_listed_for_an_employee_and_a_client_by_one_relisted_user_keeps_the_user(
    client_first: bool,
) -> None:
    # sf-1 is listed under ann@ and, twice, under cy@: once as an employee, once as a client.
    # u-1's username is cy@: skipped, not removed, whichever cy@ listing came first.
    ann = sf("sf-1", "ann@acme.example")
    employee, client = sf("sf-1", "cy@acme.example"), sf("sf-1", "cy@acme.example", employee=False)
    plan = plan_for(
        [sm("u-1", "gone@acme.example", PROVISIONED, username="cy@acme.example")],
        [ann, client, employee] if client_first else [ann, employee, client],
    )

    assert plan.deprovision == () and plan.held == ()
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.SM_USERNAME_IS_AN_EMPLOYEE, "u-1")
    ]


@pytest.mark.parametrize("provisioned_first", [False, True])
@pytest.mark.parametrize("provisioned_listings", [1, 2])
def test_a_services_manager_user_listed_in_two_states_is_a_conflict(
    provisioned_first: bool, provisioned_listings: int
) -> None:
    listings = [
        sm("u-1", "ann@acme.example"),
        *[sm("u-1", "ann@acme.example", PROVISIONED)] * provisioned_listings,
    ]
    plan = plan_for(
        listings[::-1] if provisioned_first else listings, [sf("sf-1", "ann@acme.example")]
    )

    assert_no_action(plan)
    assert [(c.match_key, c.sm_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-1",))
    ]
    assert plan.sm_users == 1 and plan.provisioned_before == 1 and plan.in_sync == 0


@pytest.mark.parametrize("order", [("u-0", "u-1", "u-1"), ("u-1", "u-0", "u-1")])
def test_a_replayed_user_on_a_shared_address_is_in_its_conflict_once(
    order: tuple[str, ...],
) -> None:
    plan = plan_for([sm(i, "ann@acme.example", PROVISIONED) for i in order], [])

    assert [(c.match_key, c.sm_user_ids) for c in plan.conflicts] == [
        ("ann@acme.example", ("u-0", "u-1"))
    ]
    assert plan.sm_users == 2 and plan.provisioned_before == 2


@pytest.mark.parametrize("provisioned_first", [False, True])
def test_a_services_manager_user_listed_twice_without_an_address_is_skipped_once(
    provisioned_first: bool,
) -> None:
    listings = [sm("u-1", "no-at-sign"), sm("u-1", "a@b@c", PROVISIONED)]
    plan = plan_for(listings[::-1] if provisioned_first else listings, [])

    assert [(s.reason, s.user_id, s.email) for s in plan.skipped] == [
        (SkipReason.SM_USER_WITHOUT_EMAIL, "u-1", "a@b@c")
    ]
    assert plan.sm_users == 1


def test_a_sharefile_user_listed_twice_alike_is_one_user() -> None:
    # Alike for the plan (only the name differs): no conflict, and the kept listing does not
    # depend on the order either.
    first = SharefileUser(id="sf-1", email="ann@acme.example", first_name="Ann")
    second = SharefileUser(id="sf-1", email="ann@acme.example", first_name="Anne")
    plans = [
        plan_for([sm("u-9", "zed@acme.example")], users)
        for users in ([first, second], [second, first])
    ]

    assert plans[0] == plans[1]
    assert plans[0].conflicts == ()
    assert [(u.sharefile_user_id, u.name) for u in plans[0].unmatched] == [("sf-1", "Ann")]


def test_a_username_on_an_address_listed_only_by_a_disagreeing_listing_keeps_the_user() -> None:
    # u-3's e-mail matches nobody; its username is the address of the listing of sf-2 that is
    # not indexed ("bob.new@" sorts first and is kept): not removed as absent.
    plan = plan_for(
        [sm("u-3", "gone@acme.example", PROVISIONED, username="bob@acme.example")],
        [sf("sf-2", "bob@acme.example"), sf("sf-2", "bob.new@acme.example")],
    )

    assert plan.deprovision == () and plan.held == ()
    assert [(s.reason, s.user_id) for s in plan.skipped] == [
        (SkipReason.SM_USERNAME_IS_AN_EMPLOYEE, "u-3")
    ]


@pytest.mark.parametrize(
    ("sm_email", "sf_email"),
    [
        ("JOSÉ@acme.example", "jose\u0301@acme.example"),
        ("john@acme.example", "ｊｏｈｎ＠ａｃｍｅ.example"),
        ("  John@ACME.example", "john@acme.example\t"),
    ],
)
def test_normalised_addresses_match_across_sides(sm_email: str, sf_email: str) -> None:
    plan = plan_for([sm("u-1", sm_email, PROVISIONED)], [sf("sf-1", sf_email)])

    assert_no_action(plan)
    assert plan.in_sync == 1
    assert plan.unmatched == ()


def test_employee_without_sm_user_is_reported_unmatched() -> None:
    employee = SharefileUser(
        id="sf-1", email="Ann@Acme.example", first_name="Ann", last_name="Lee", is_disabled=True
    )
    plan = plan_for([], [employee])

    assert_no_action(plan)
    [unmatched] = plan.unmatched
    assert unmatched.sharefile_user_id == "sf-1"
    assert unmatched.email == "Ann@Acme.example"
    assert unmatched.match_key == "ann@acme.example"
    assert unmatched.name == "Ann Lee"
    assert unmatched.is_disabled is True


# --- order, counts and determinism ----------------------------------------------------------------


def mixed_customer() -> tuple[list[SmUser], list[SharefileUser]]:
    sm_users = [
        sm("u-09", "zed@acme.example"),
        sm("u-01", "amy@acme.example"),
        sm("u-05", "Mia@acme.example", FAILED),
        sm("u-02", "bob@acme.example", PROVISIONED),
        sm("u-07", "old@acme.example", PROVISIONED),
        sm("u-03", "gone@acme.example", PROVISIONED),
        sm("u-04", "dup@acme.example"),
        sm("u-06", "DUP@acme.example", PROVISIONED),
        sm("u-08", "fly@acme.example", PROVISIONING),
        sm("u-10", None, PROVISIONED),
        sm("u-11", "off@acme.example", enabled=False),
    ]
    sharefile_users = [
        sf("sf-9", "zed@acme.example"),
        sf("sf-1", "amy@acme.example"),
        sf("sf-5", "mia@acme.example"),
        sf("sf-2", "bob@acme.example"),
        sf("sf-4", "dup@acme.example"),
        sf("sf-8", "fly@acme.example"),
        sf("sf-11", "off@acme.example"),
        sf("sf-20", "new@acme.example"),
        sf("sf-21", "also-new@acme.example"),
        sf("sf-22", None),
    ]
    return sm_users, sharefile_users


def test_actions_are_sorted_by_match_key_then_user_id() -> None:
    plan = plan_for(*mixed_customer())

    assert [i.user_id for i in plan.provision] == ["u-01", "u-05", "u-09"]
    # Held, not sent: sf-22 has no usable address and may be either of them (the guard).
    assert [i.user_id for i in plan.held] == ["u-03", "u-07"]
    assert [u.sharefile_user_id for u in plan.unmatched] == ["sf-21", "sf-20"]
    for items in (plan.provision, plan.held):
        keys = [(i.match_key, i.user_id) for i in items]
        assert keys == sorted(keys)


def test_counts_describe_the_inputs_and_every_category() -> None:
    plan = plan_for(*mixed_customer())

    assert plan.counts() == {
        "sm_users": 11,
        "sharefile_employees": 10,
        "provisioned_before": 5,
        "provision": 3,
        "deprovision": 0,
        "held": 2,
        "unmatched": 2,
        "conflicts": 1,
        "pending": 1,
        "skipped": 3,
        "in_sync": 1,
    }


@pytest.mark.parametrize("seed", range(10))
def test_shuffled_inputs_give_the_identical_plan(seed: int) -> None:
    sm_users, sharefile_users = mixed_customer()
    expected = plan_for(sm_users, sharefile_users)
    rng = random.Random(seed)
    rng.shuffle(sm_users)
    rng.shuffle(sharefile_users)

    shuffled = plan_for(sm_users, sharefile_users)

    assert shuffled == expected
    assert shuffled.plan_id == expected.plan_id
    assert shuffled.model_dump_json() == expected.model_dump_json()


def test_reconcile_accepts_one_shot_iterators() -> None:
    sm_users, sharefile_users = mixed_customer()
    expected = plan_for(sm_users, sharefile_users)

    streamed = reconcile(
        iter(sm_users),
        (u for u in sharefile_users),
        Policy(guard=NO_GUARD),
        customer_id="cust-1",
    )

    assert streamed == expected


def test_services_manager_side_is_streamed_after_sharefile_and_not_kept() -> None:
    # The worker streams Services Manager's pages into reconcile: ShareFile's feed must be read
    # completely first, and no SM record may stay referenced once its outcome is known.
    sm_users = [
        sm(f"u-{n}", f"User{n}@Acme.example", STATES[n % 4], enabled=n % 7 != 0)
        for n in range(3000)
    ]
    sharefile_users = [sf(f"sf-{n}", f"user{n}@acme.example") for n in range(0, 3000, 3)]
    expected = plan_for(sm_users, sharefile_users)
    payloads = [dataclasses.asdict(user) for user in sm_users]
    del sm_users
    live: dict[str, int] = {}

    def live_sm_records() -> int:
        gc.collect()
        return sum(isinstance(o, SmUser) for o in gc.get_objects())

    def sharefile_stream() -> Iterator[SharefileUser]:
        yield from sharefile_users
        live["before"] = live_sm_records()

    def sm_stream() -> Iterator[SmUser]:
        assert "before" in live, "Services Manager was read before ShareFile's feed was complete"
        for payload in payloads:
            yield SM_USER.validate_python(payload)
        live["after"] = live_sm_records()

    plan = reconcile(sm_stream(), sharefile_stream(), Policy(guard=NO_GUARD), customer_id="cust-1")

    assert live["after"] - live["before"] <= 1  # the last record yielded, at most
    assert plan == expected
    assert plan.counts()["deprovision"] > 0


# --- records from real payloads -------------------------------------------------------------------


def test_sm_user_is_read_from_the_services_manager_contract() -> None:
    user = SM_USER.validate_python(
        {
            "id": "u-000123",
            "username": "jdoe@acme.example",
            "email": "John.Doe@Acme.example",
            "display_name": "John Doe",
            "enabled": True,
            "sharefile": {"state": "provisioned", "updated_at": "2026-11-20T10:00:00Z"},
            "department": "unknown fields are ignored",
        }
    )

    assert user == SmUser(
        id="u-000123",
        state=PROVISIONED,
        username="jdoe@acme.example",
        email="John.Doe@Acme.example",
        display_name="John Doe",
        enabled=True,
    )


def test_sm_user_with_null_enabled_is_enabled() -> None:
    user = SM_USER.validate_python(
        {"id": "u-1", "email": None, "enabled": None, "sharefile": {"state": "failed"}}
    )

    assert user.enabled is True
    assert user.state is FAILED


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "u-1", "sharefile": {"state": "archived"}},
        {"id": "u-1"},
        {"id": "", "sharefile": {"state": "provisioned"}},
        {"sharefile": {"state": "provisioned"}},
    ],
)
def test_sm_user_without_a_known_state_or_id_is_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SM_USER.validate_python(payload)


def test_sharefile_user_is_read_from_the_odata_feed() -> None:
    user = SHAREFILE_USER.validate_python(
        {
            "odata.type": "ShareFile.Api.Models.Contact",
            "Id": "a1b2c3d4",
            "url": "https://acme.sf-api.com/sf/v3/Contacts(a1b2c3d4)",
            "Email": "John.Doe@Acme.example",
            "Name": "Doe, John",
            "FirstName": "John",
            "LastName": "Doe",
            "Company": "Acme",
            "IsConfirmed": True,
            "IsDisabled": True,
            "CreatedDate": "2016-09-12T19:06:31.667Z",
        }
    )

    assert user == SharefileUser(
        id="a1b2c3d4",
        email="John.Doe@Acme.example",
        first_name="John",
        last_name="Doe",
        is_disabled=True,
        is_employee=True,
    )


def test_sharefile_user_with_null_flag_and_missing_email_is_accepted() -> None:
    user = SHAREFILE_USER.validate_python({"Id": "a1", "IsDisabled": None, "FirstName": None})

    assert user.email is None
    assert user.is_disabled is False
    assert user.first_name is None


def test_sharefile_user_without_id_is_rejected() -> None:
    with pytest.raises(ValidationError):
        SHAREFILE_USER.validate_python({"Email": "a@acme.example"})


def test_records_are_frozen() -> None:
    user = sm("u-1", "ann@acme.example")
    employee = sf("sf-1", "ann@acme.example")

    with pytest.raises(dataclasses.FrozenInstanceError):
        user.state = PROVISIONED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        employee.is_disabled = True  # type: ignore[misc]
