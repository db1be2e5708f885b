"""The safety guard: removals that look like an accident are held until an operator approves them.

Deprovisioning deletes a user's ShareFile account, so every threshold is tested at its boundary.
"""

from __future__ import annotations

import dataclasses

import pytest

from domain.plan import Plan, removals_id
from domain.policy import DisabledEmployees, HoldCode, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import SharefileState, SharefileUser, SmUser

PROVISIONED = SharefileState.PROVISIONED


def customer(
    *, staying: int, leaving: int, joining: int = 0
) -> tuple[list[SmUser], list[SharefileUser]]:
    """`staying` provisioned employees, `leaving` provisioned users gone from ShareFile, and
    `joining` employees not yet provisioned."""
    sm_users = [
        SmUser(id=f"u-stay-{n:04}", state=PROVISIONED, email=f"stay{n}@acme.example")
        for n in range(staying)
    ]
    sm_users += [
        SmUser(id=f"u-leave-{n:04}", state=PROVISIONED, email=f"leave{n}@acme.example")
        for n in range(leaving)
    ]
    sm_users += [
        SmUser(
            id=f"u-join-{n:04}", state=SharefileState.NOT_PROVISIONED, email=f"join{n}@acme.example"
        )
        for n in range(joining)
    ]
    employees = [
        SharefileUser(id=f"sf-stay-{n:04}", email=f"stay{n}@acme.example") for n in range(staying)
    ]
    employees += [
        SharefileUser(id=f"sf-join-{n:04}", email=f"join{n}@acme.example") for n in range(joining)
    ]
    return sm_users, employees


def run(
    staying: int,
    leaving: int,
    *,
    joining: int = 0,
    policy: Policy | None = None,
    declared: int | None = None,
) -> Plan:
    sm_users, employees = customer(staying=staying, leaving=leaving, joining=joining)
    return reconcile(sm_users, employees, policy, customer_id="cust-1", sharefile_declared=declared)


def codes(plan: Plan) -> set[HoldCode]:
    return {reason.code for reason in plan.hold_reasons}


def assert_released(plan: Plan, leaving: int) -> None:
    assert len(plan.deprovision) == leaving
    assert plan.held == ()
    assert plan.hold_reasons == ()
    assert not plan.is_held


def assert_held(plan: Plan, leaving: int) -> None:
    assert plan.deprovision == ()
    assert len(plan.held) == leaving
    assert plan.hold_reasons
    assert plan.is_held
    assert plan.approved is False


# --- defaults -------------------------------------------------------------------------------------


def test_guard_defaults_are_the_documented_ones() -> None:
    guard = Policy().guard
    assert guard.max_deprovision == 25
    assert guard.max_deprovision_ratio == 0.2
    assert guard.ratio_floor == 20


def test_small_removal_goes_out() -> None:
    plan = run(staying=50, leaving=2)

    assert_released(plan, leaving=2)


# --- max_deprovision ------------------------------------------------------------------------------


def test_exactly_max_deprovision_removals_are_not_held() -> None:
    # 25 of 200 provisioned is 12.5%: only the absolute threshold is in play.
    plan = run(staying=175, leaving=25)

    assert_released(plan, leaving=25)


def test_one_more_than_max_deprovision_holds_every_removal() -> None:
    plan = run(staying=174, leaving=26)

    assert_held(plan, leaving=26)
    assert codes(plan) == {HoldCode.TOO_MANY_DEPROVISIONS}
    assert "26" in plan.hold_reasons[0].message
    assert "25" in plan.hold_reasons[0].message


def test_held_plan_still_provisions_new_employees() -> None:
    plan = run(staying=174, leaving=26, joining=3)

    assert_held(plan, leaving=26)
    assert [item.user_id for item in plan.provision] == [
        "u-join-0000",
        "u-join-0001",
        "u-join-0002",
    ]
    assert plan.actions == plan.provision


def test_held_items_keep_their_evidence() -> None:
    plan = run(staying=174, leaving=26)

    assert all(item.rule == "absent_from_sharefile" for item in plan.held)
    assert all(item.sm_state is PROVISIONED for item in plan.held)
    assert [item.match_key for item in plan.held] == sorted(item.match_key for item in plan.held)


def test_max_deprovision_is_configurable() -> None:
    policy = Policy(guard=SafetyGuard(max_deprovision=2))

    assert_released(run(staying=50, leaving=2, policy=policy), leaving=2)
    assert_held(run(staying=50, leaving=3, policy=policy), leaving=3)


# --- ratio ----------------------------------------------------------------------------------------


def test_exactly_the_max_ratio_is_not_held() -> None:
    plan = run(staying=80, leaving=20)  # 20 of 100 = 20%

    assert_released(plan, leaving=20)


def test_above_the_max_ratio_is_held() -> None:
    plan = run(staying=79, leaving=21)  # 21 of 100 = 21%, under max_deprovision

    assert_held(plan, leaving=21)
    assert codes(plan) == {HoldCode.DEPROVISION_RATIO}


def test_ratio_applies_from_the_floor() -> None:
    plan = run(staying=15, leaving=5)  # 5 of 20 = 25%, with exactly ratio_floor provisioned

    assert_held(plan, leaving=5)
    assert codes(plan) == {HoldCode.DEPROVISION_RATIO}


def test_below_the_floor_the_ratio_is_taken_of_the_floor() -> None:
    plan = run(staying=9, leaving=10)  # 10 of 19: 50% of the floor's 20 users

    assert_held(plan, leaving=10)
    assert codes(plan) == {HoldCode.DEPROVISION_RATIO}
    [reason] = plan.hold_reasons
    assert reason.message == (
        "10 of 19 provisioned users (taken of at least ratio_floor=20 users: 50%) "
        "exceed max_deprovision_ratio=20%"
    )


def test_a_small_customer_may_lose_the_floors_share_of_users() -> None:
    assert_released(run(staying=3, leaving=2), leaving=2)  # 2 of 5: 10% of 20
    assert_released(run(staying=1, leaving=4), leaving=4)  # 4 of 5: 20% of 20, at the limit
    plan = run(staying=1, leaving=5)  # 5 of 6: 25% of 20
    assert_held(plan, leaving=5)
    assert codes(plan) == {HoldCode.DEPROVISION_RATIO}


def test_a_customer_of_19_losing_18_is_held() -> None:
    plan = run(staying=1, leaving=18)

    assert_held(plan, leaving=18)
    assert codes(plan) == {HoldCode.DEPROVISION_RATIO}


def test_ratio_at_the_floor_exactly_at_the_limit_is_not_held() -> None:
    plan = run(staying=16, leaving=4)  # 4 of 20 = 20%

    assert_released(plan, leaving=4)


def test_both_thresholds_are_reported_when_both_are_exceeded() -> None:
    plan = run(staying=50, leaving=30)

    assert codes(plan) == {HoldCode.TOO_MANY_DEPROVISIONS, HoldCode.DEPROVISION_RATIO}


# --- an incomplete ShareFile answer ---------------------------------------------------------------


def test_empty_sharefile_side_holds_removals() -> None:
    plan = run(staying=0, leaving=3)

    assert_held(plan, leaving=3)
    assert codes(plan) == {HoldCode.SOURCE_EMPTY}


def test_sharefile_side_with_only_client_users_counts_as_empty() -> None:
    sm_users = [SmUser(id="u-1", state=PROVISIONED, email="ann@acme.example")]
    clients = [SharefileUser(id="sf-1", email="ann@acme.example", is_employee=False)]

    plan = reconcile(sm_users, clients, customer_id="cust-1")

    assert_held(plan, leaving=1)
    assert codes(plan) == {HoldCode.SOURCE_EMPTY}


def test_empty_sharefile_side_without_provisioned_users_holds_nothing() -> None:
    plan = reconcile(
        [SmUser(id="u-1", state=SharefileState.NOT_PROVISIONED, email="a@x.example")], []
    )

    assert plan.hold_reasons == ()
    assert plan.held == ()


def test_feed_that_declared_more_employees_than_it_returned_holds_removals() -> None:
    plan = run(staying=10, leaving=1, declared=11)

    assert_held(plan, leaving=1)
    assert codes(plan) == {HoldCode.SOURCE_INCOMPLETE}
    assert plan.sharefile_declared == 11
    assert "11" in plan.hold_reasons[0].message


@pytest.mark.parametrize("declared", [None, 10, 9])
def test_feed_that_returned_what_it_declared_is_trusted(declared: int | None) -> None:
    plan = run(staying=10, leaving=1, declared=declared)

    assert_released(plan, leaving=1)


@pytest.mark.parametrize("declared", [30, None])
def test_a_feed_that_listed_an_employee_twice_holds_removals(declared: int | None) -> None:
    # Offset pages read while the account changed: stay0 listed again, stay1 pushed off a page,
    # so the count adds up. stay1 must not be removed as "absent from ShareFile".
    sm_users, employees = customer(staying=30, leaving=0)
    shifted = [employees[0], employees[0], *employees[2:]]

    plan = reconcile(sm_users, shifted, customer_id="cust-1", sharefile_declared=declared)

    assert plan.deprovision == ()
    assert [item.user_id for item in plan.held] == ["u-stay-0001"]
    assert codes(plan) == {HoldCode.SOURCE_INCOMPLETE}
    assert plan.conflicts == ()  # one user listed twice is not two users on one address
    assert plan.sharefile_employees == 29
    expected = (
        "ShareFile declared 30 employees but returned 29 (1 more listed twice)"
        if declared
        else "ShareFile listed 1 employees twice: the account changed while its pages were "
        "read, and others may be missing"
    )
    assert [r.message for r in plan.hold_reasons] == [expected]


def test_an_employee_listed_again_under_a_new_address_holds_removals() -> None:
    # stay0 changed address between two pages and was listed again under it, pushing stay1 off
    # a page: the count adds up, and stay1 must not be removed as absent.
    sm_users, employees = customer(staying=30, leaving=0)
    moved = SharefileUser(id=employees[0].id, email="stay0.new@acme.example")
    shifted = [employees[0], moved, *employees[2:]]

    plan = reconcile(sm_users, shifted, customer_id="cust-1", sharefile_declared=30)

    assert plan.deprovision == ()
    assert [item.user_id for item in plan.held] == ["u-stay-0001"]
    assert codes(plan) == {HoldCode.SOURCE_INCOMPLETE}
    assert plan.sharefile_employees == 29 and plan.unmatched == ()  # one user, counted once
    # Which address is current is unknown: both are conflicts, u-stay-0000 is left alone.
    assert [(c.match_key, c.sm_user_ids) for c in plan.conflicts] == [
        ("stay0.new@acme.example", ()),
        ("stay0@acme.example", ("u-stay-0000",)),
    ]


def test_a_client_listed_twice_does_not_hold_removals() -> None:
    sm_users, employees = customer(staying=30, leaving=1)
    client = SharefileUser(id="sf-client", email="guest@acme.example", is_employee=False)

    plan = reconcile(sm_users, [*employees, client, client], customer_id="cust-1")

    assert_released(plan, leaving=1)


def test_services_manager_users_listed_twice_count_once_and_hold_removals() -> None:
    # A cursor that replayed a page: 20 provisioned users listed again made the ratio's base
    # 60 instead of 40, and 10 removals (25 %) went out under the 20 % limit.
    sm_users, employees = customer(staying=30, leaving=10)
    replayed = [*sm_users, *sm_users[:20]]

    plan = reconcile(replayed, employees, customer_id="cust-1")

    assert plan.deprovision == () and len(plan.held) == 10
    assert plan.provisioned_before == 40 and plan.sm_users == 40
    assert plan.conflicts == ()  # a user listed twice is not two users on one address
    assert "Services Manager listed 20 users twice" in plan.hold_reasons[0].message
    assert codes(plan) == {HoldCode.SOURCE_INCOMPLETE, HoldCode.DEPROVISION_RATIO}


@pytest.mark.parametrize("new_first", [False, True])
def test_a_services_manager_user_listed_again_under_a_new_address_is_not_removed(
    new_first: bool,
) -> None:
    # A cursor replayed a page after u-stay-0000's address changed: listed under both. Under
    # the old one it matches an active employee; under the new one it would be "absent".
    sm_users, employees = customer(staying=30, leaving=1)
    moved = SmUser(id="u-stay-0000", state=PROVISIONED, email="stay0.new@acme.example")
    listed = [moved, *sm_users] if new_first else [*sm_users, moved]

    plan = reconcile(listed, employees, customer_id="cust-1")

    assert plan.deprovision == ()
    assert [item.user_id for item in plan.held] == ["u-leave-0000"]
    assert [(c.match_key, c.sm_user_ids, c.sharefile_user_ids) for c in plan.conflicts] == [
        ("stay0.new@acme.example", ("u-stay-0000",), ()),
        ("stay0@acme.example", ("u-stay-0000",), ("sf-stay-0000",)),
    ]
    assert plan.sm_users == 31 and plan.provisioned_before == 31
    assert "Services Manager listed 1 users twice" in plan.hold_reasons[0].message


def test_services_manager_users_listed_twice_without_removals_change_nothing() -> None:
    sm_users, employees = customer(staying=30, leaving=0, joining=2)

    plan = reconcile([*sm_users, *sm_users], employees, customer_id="cust-1")

    assert plan == reconcile(sm_users, employees, customer_id="cust-1")


@pytest.mark.parametrize(
    "written", ["<stay0@acme.example>", "mailto:stay0@acme.example", "stay0@acme.example."]
)
def test_an_employee_whose_address_is_written_oddly_holds_the_removal_it_would_cause(
    written: str,
) -> None:
    # Keyed as written, it matched nobody: u-stay-0000, an active employee, went out as absent.
    sm_users, employees = customer(staying=30, leaving=0)
    odd = [SharefileUser(id=employees[0].id, email=written), *employees[1:]]

    plan = reconcile(sm_users, odd, customer_id="cust-1")

    assert plan.deprovision == ()
    assert [item.user_id for item in plan.held] == ["u-stay-0000"]
    assert codes(plan) == {HoldCode.SOURCE_UNMATCHABLE}


def test_two_users_on_one_address_are_still_a_conflict_next_to_a_repeat() -> None:
    sm_users = [SmUser(id="u-1", state=PROVISIONED, email="twin@acme.example")]
    first = SharefileUser(id="sf-1", email="twin@acme.example")
    other = SharefileUser(id="sf-2", email="Twin@acme.example")

    plan = reconcile(sm_users, [first, other, first, other], customer_id="cust-1")

    [conflict] = plan.conflicts
    assert conflict.sharefile_user_ids == ("sf-1", "sf-2")
    assert plan.sharefile_employees == 2


def test_guard_ignores_plans_without_removals() -> None:
    plan = run(staying=0, leaving=0, joining=2, declared=50)

    assert plan.hold_reasons == ()
    assert len(plan.provision) == 2


def test_disabled_employee_removals_count_towards_the_guard() -> None:
    sm_users, employees = customer(staying=100, leaving=0)
    disabled = [
        SharefileUser(id=e.id, email=e.email, is_disabled=n < 26) for n, e in enumerate(employees)
    ]
    policy = Policy(disabled_employees=DisabledEmployees.DEPROVISION)

    plan = reconcile(sm_users, disabled, policy, customer_id="cust-1")

    assert_held(plan, leaving=26)
    assert codes(plan) == {HoldCode.TOO_MANY_DEPROVISIONS, HoldCode.DEPROVISION_RATIO}


# --- SafetyGuard.check on its own -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("deprovisions", "provisioned", "expected"),
    [
        (25, 1000, set()),
        (26, 1000, {HoldCode.TOO_MANY_DEPROVISIONS}),
        (20, 100, set()),
        (21, 100, {HoldCode.DEPROVISION_RATIO}),
        (4, 20, set()),
        (5, 20, {HoldCode.DEPROVISION_RATIO}),
        (4, 19, set()),
        (5, 19, {HoldCode.DEPROVISION_RATIO}),
        (19, 19, {HoldCode.DEPROVISION_RATIO}),
        (1, 1, set()),
        (0, 0, set()),
    ],
)
def test_check_thresholds_at_their_boundaries(
    deprovisions: int, provisioned: int, expected: set[HoldCode]
) -> None:
    reasons = SafetyGuard().check(
        deprovisions=deprovisions,
        provisioned=provisioned,
        employees_received=provisioned,
        employees_declared=None,
    )

    assert {r.code for r in reasons} == expected


# --- approval -------------------------------------------------------------------------------------


def test_approving_the_held_plan_releases_exactly_its_removals() -> None:
    held = run(staying=174, leaving=26)

    approved = run(staying=174, leaving=26, policy=Policy(approved_plan_id=held.plan_id))

    assert approved.plan_id == held.plan_id
    assert approved.approved is True
    assert approved.deprovision == held.held
    assert approved.held == ()
    assert approved.hold_reasons == ()


def test_approval_of_a_plan_whose_inputs_changed_does_not_release() -> None:
    held = run(staying=174, leaving=26)

    # One more user left ShareFile since the operator looked: a different plan.
    changed = run(staying=173, leaving=27, policy=Policy(approved_plan_id=held.plan_id))

    assert changed.plan_id != held.plan_id
    assert_held(changed, leaving=27)


def test_approval_for_another_customer_does_not_release() -> None:
    sm_users, employees = customer(staying=174, leaving=26)
    held = reconcile(sm_users, employees, customer_id="cust-1")

    other = reconcile(
        sm_users, employees, Policy(approved_plan_id=held.plan_id), customer_id="cust-2"
    )

    assert_held(other, leaving=26)


def replan_after_the_hold(*, staying: int, leaving: int, joining: int, policy: Policy) -> Plan:
    """The customer again after a held run sent its provisions: the joiners are in flight."""
    sm_users, employees = customer(staying=staying, leaving=leaving, joining=joining)
    in_flight = [
        dataclasses.replace(u, state=SharefileState.PROVISIONING)
        if u.state is SharefileState.NOT_PROVISIONED
        else u
        for u in sm_users
    ]
    return reconcile(in_flight, employees, policy, customer_id="cust-1")


def test_approving_the_removals_of_a_held_plan_with_provisions_releases_them_in_the_re_plan() -> (
    None
):
    held = run(staying=174, leaving=26, joining=3)
    assert len(held.provision) == 3 and len(held.held) == 26  # the provisions went out
    approval = removals_id("cust-1", held.held)

    replan = replan_after_the_hold(
        staying=174, leaving=26, joining=3, policy=Policy(approved_plan_id=approval)
    )

    assert replan.plan_id == approval != held.plan_id  # only the removals are left to send
    assert replan.approved is True
    assert replan.deprovision == held.held
    assert replan.provision == () and len(replan.pending) == 3


def test_an_approval_naming_the_whole_held_plan_does_not_release_its_re_plan() -> None:
    held = run(staying=174, leaving=26, joining=3)

    replan = replan_after_the_hold(
        staying=174, leaving=26, joining=3, policy=Policy(approved_plan_id=held.plan_id)
    )

    assert_held(replan, leaving=26)


def test_approved_removals_go_out_whatever_is_provisioned_with_them_but_only_those() -> None:
    held = run(staying=174, leaving=26)
    approval = removals_id("cust-1", held.held)
    assert approval == held.plan_id  # a plan of removals alone is its own removals' plan

    more_joiners = run(staying=174, leaving=26, joining=5, policy=Policy(approved_plan_id=approval))
    one_more_leaver = run(
        staying=173, leaving=27, joining=5, policy=Policy(approved_plan_id=approval)
    )

    assert more_joiners.approved and more_joiners.deprovision == held.held
    assert len(more_joiners.provision) == 5
    assert_held(one_more_leaver, leaving=27)


def test_approval_of_a_plan_that_needs_none_changes_nothing() -> None:
    plain = run(staying=50, leaving=2)

    approved = run(staying=50, leaving=2, policy=Policy(approved_plan_id=plain.plan_id))

    assert approved == plain
    assert approved.approved is False


def test_plan_id_is_stable_and_content_based() -> None:
    first = run(staying=30, leaving=3, joining=2)
    again = run(staying=30, leaving=3, joining=2)
    more = run(staying=30, leaving=3, joining=3)

    assert first.plan_id == again.plan_id
    assert first.plan_id.startswith("plan-")
    assert more.plan_id != first.plan_id


def test_plan_id_does_not_depend_on_whether_the_guard_held() -> None:
    strict = Policy(guard=SafetyGuard(max_deprovision=0))

    assert run(staying=30, leaving=3, policy=strict).plan_id == run(staying=30, leaving=3).plan_id


def test_a_feed_where_most_employees_lack_an_address_holds_every_removal() -> None:
    guard = SafetyGuard()
    reasons = guard.check(
        deprovisions=1,
        provisioned=6,
        employees_received=6,
        employees_declared=6,
        employees_matchable=2,
    )
    assert [r.code.value for r in reasons] == ["source_unmatchable"]
    assert "only 2 of 6" in reasons[0].message


def test_a_few_employees_without_an_address_hold_a_removal_as_absent() -> None:
    # The user removed as absent from ShareFile may be the employee whose address is unusable.
    reasons = SafetyGuard().check(
        deprovisions=1,
        provisioned=6,
        employees_received=6,
        employees_declared=6,
        employees_matchable=5,
    )
    assert [r.message for r in reasons] == [
        "1 ShareFile employee(s) have no usable e-mail address, and a user removed as absent "
        "from ShareFile may be one of them"
    ]
    assert reasons[0].code is HoldCode.SOURCE_UNMATCHABLE


def test_employees_without_an_address_do_not_hold_removals_of_matched_users() -> None:
    # Removals whose ShareFile user was found (now a client user, or disabled) are not guesses.
    reasons = SafetyGuard().check(
        deprovisions=2,
        provisioned=30,
        employees_received=30,
        employees_declared=30,
        employees_matchable=29,
        absent_removals=0,
    )
    assert reasons == ()


def test_reconcile_holds_a_removal_as_absent_next_to_an_employee_without_an_address() -> None:
    sm_users, employees = customer(staying=29, leaving=1)
    stray = SharefileUser(id=employees[0].id, email="stay0@acme.example\u200b")
    plan = reconcile(sm_users, [stray, *employees[1:]], customer_id="cust-1")

    assert plan.deprovision == ()
    # stay0 cannot be matched, so both stay0 and leave0 would be removed as absent: held.
    assert sorted(item.user_id for item in plan.held) == ["u-leave-0000", "u-stay-0000"]
    assert codes(plan) == {HoldCode.SOURCE_UNMATCHABLE}


def test_reconcile_holds_removals_when_no_employee_has_a_usable_address() -> None:
    sm = [SmUser(id=f"u{i}", email=f"user{i}@acme.example", state="provisioned") for i in range(6)]
    sf = [SharefileUser(id=f"s{i}", email=None) for i in range(6)]
    plan = reconcile(sm, sf)
    assert plan.deprovision == () and len(plan.held) == 6
    # Losing all 6 users is also over the ratio (taken of the floor's 20): both reasons.
    assert [r.code.value for r in plan.hold_reasons] == ["source_unmatchable", "deprovision_ratio"]
    policy = Policy(guard=SafetyGuard(ratio_floor=30))  # 6 of 30 = 20%: only the feed's shape
    held = reconcile(sm, sf, policy)
    assert [r.code.value for r in held.hold_reasons] == ["source_unmatchable"]
