"""reconcile(): the pure planner that turns two user sets and a policy into a Plan."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from domain.matching import normalise_email
from domain.plan import (
    Action,
    Conflict,
    Pending,
    Plan,
    PlanItem,
    Rule,
    Skipped,
    SkipReason,
    Unmatched,
    plan_id_for,
)
from domain.policy import DisabledEmployees, Policy
from domain.records import SharefileState, SharefileUser, SmUser

_IN_FLIGHT = frozenset({SharefileState.PROVISIONING, SharefileState.DEPROVISIONING})
_WITHOUT_SERVICE = frozenset({SharefileState.NOT_PROVISIONED, SharefileState.FAILED})

_User = TypeVar("_User", SmUser, SharefileUser)


def reconcile(
    sm_users: Iterable[SmUser],
    sharefile_users: Iterable[SharefileUser],
    policy: Policy | None = None,
    *,
    customer_id: str = "",
    sharefile_declared: int | None = None,
) -> Plan:
    """Plan the provisioning requests that make Services Manager match ShareFile's employees.

    `sharefile_users` is what the Employees feed returned (plus, optionally, client users with
    `is_employee=False`); `sharefile_declared` is the count the feed announced, if it did.
    The result depends only on the arguments: same inputs, same plan, same order.
    """
    policy = policy or Policy()
    skipped: list[Skipped] = []

    # ShareFile first: its keys are usually its own e-mail strings (already lower case), and
    # the Services Manager side below reuses them instead of keeping a second copy of each.
    sf_index: dict[str, SharefileUser] = {}
    sf_duplicates: dict[str, list[SharefileUser]] = {}
    employees = 0
    unmatchable = 0
    for record in sharefile_users:
        employees += record.is_employee
        key = normalise_email(record.email)
        if key is None:
            if record.is_employee:
                unmatchable += 1
                skipped.append(
                    Skipped(
                        reason=SkipReason.SHAREFILE_USER_WITHOUT_EMAIL,
                        sharefile_user_id=record.id,
                        email=record.email,
                    )
                )
            continue
        first_sf = sf_index.setdefault(key, record)
        if first_sf is not record:
            sf_duplicates.setdefault(key, [first_sf]).append(record)

    sm_index: dict[str, SmUser] = {}
    sm_duplicates: dict[str, list[SmUser]] = {}
    sm_count = 0
    provisioned_before = 0
    provisioned = SharefileState.PROVISIONED
    for sm in sm_users:
        sm_count += 1
        if sm.state is provisioned:
            provisioned_before += 1
        key = normalise_email(sm.email) or normalise_email(sm.username)
        if key is None:
            if sm.state is not SharefileState.NOT_PROVISIONED:
                # Has (or may have) the service but cannot be matched: never guess, never remove.
                skipped.append(
                    Skipped(reason=SkipReason.SM_USER_WITHOUT_EMAIL, user_id=sm.id, email=sm.email)
                )
            continue
        match = sf_index.get(key)
        if match is not None and match.email == key:
            key = match.email  # the same text: keep one string object, not two
        first_sm = sm_index.setdefault(key, sm)
        if first_sm is not sm:
            sm_duplicates.setdefault(key, [first_sm]).append(sm)

    conflicts = [
        Conflict(
            match_key=key,
            sm_user_ids=tuple(sorted(u.id for u in _all_on(sm_index, sm_duplicates, key))),
            sharefile_user_ids=tuple(sorted(u.id for u in _all_on(sf_index, sf_duplicates, key))),
        )
        for key in sorted(sm_duplicates.keys() | sf_duplicates.keys())
    ]
    conflicted = {c.match_key for c in conflicts}

    provision: list[PlanItem] = []
    deprovision: list[PlanItem] = []
    pending: list[Pending] = []
    in_sync = 0
    keep_disabled = policy.disabled_employees is DisabledEmployees.KEEP

    for key, sm in sm_index.items():
        if key in conflicted:
            continue
        sf = sf_index.get(key)
        sf_id = sf.id if sf is not None else None
        if sm.state in _IN_FLIGHT:
            pending.append(
                Pending(user_id=sm.id, email=sm.email, state=sm.state, sharefile_user_id=sf_id)
            )
            continue
        entitled = sf is not None and sf.is_employee and (keep_disabled or not sf.is_disabled)
        if sm.state is SharefileState.PROVISIONED:
            if entitled:
                in_sync += 1
            else:
                deprovision.append(_item(Action.DEPROVISION, sm, key, sf, _removal_rule(sf)))
        elif entitled:
            if not sm.enabled:
                skipped.append(
                    Skipped(
                        reason=SkipReason.SM_USER_DISABLED,
                        user_id=sm.id,
                        sharefile_user_id=sf_id,
                        email=sm.email,
                    )
                )
            else:
                rule = (
                    Rule.RETRY_AFTER_FAILURE
                    if sm.state is SharefileState.FAILED
                    else Rule.EMPLOYEE_WITHOUT_SERVICE
                )
                provision.append(_item(Action.PROVISION, sm, key, sf, rule))
        elif sm.state is SharefileState.FAILED:
            # The failed request may have been a removal: the user may still hold an account.
            skipped.append(
                Skipped(
                    reason=SkipReason.PREVIOUS_REQUEST_FAILED,
                    user_id=sm.id,
                    sharefile_user_id=sf_id,
                    email=sm.email,
                )
            )
        else:
            in_sync += 1

    unmatched = [
        Unmatched(
            sharefile_user_id=sf.id,
            email=sf.email or key,
            match_key=key,
            name=_display_name(sf),
            is_disabled=sf.is_disabled,
        )
        for key, sf in sf_index.items()
        if sf.is_employee and key not in sm_index and key not in conflicted
    ]

    provision.sort(key=_by_key_then_id)
    deprovision.sort(key=_by_key_then_id)
    pending.sort(key=lambda p: p.user_id)
    unmatched.sort(key=lambda u: (u.match_key, u.sharefile_user_id))
    skipped.sort(key=lambda s: (s.reason.value, s.user_id or "", s.sharefile_user_id or ""))

    intended = tuple(deprovision)
    plan_id = plan_id_for(customer_id, tuple(provision), intended)
    reasons = policy.guard.check(
        deprovisions=len(intended),
        provisioned=provisioned_before,
        employees_received=employees,
        employees_declared=sharefile_declared,
        employees_matchable=employees - unmatchable,
    )
    approved = bool(reasons) and policy.approved_plan_id == plan_id
    held = bool(reasons) and not approved
    return Plan(
        plan_id=plan_id,
        provision=tuple(provision),
        deprovision=() if held else intended,
        held=intended if held else (),
        hold_reasons=reasons if held else (),
        approved=approved,
        unmatched=tuple(unmatched),
        conflicts=tuple(conflicts),
        pending=tuple(pending),
        skipped=tuple(skipped),
        in_sync=in_sync,
        sm_users=sm_count,
        sharefile_employees=employees,
        sharefile_declared=sharefile_declared,
        provisioned_before=provisioned_before,
    )


def _all_on(index: dict[str, _User], duplicates: dict[str, list[_User]], key: str) -> list[_User]:
    if key in duplicates:
        return duplicates[key]
    return [index[key]] if key in index else []


def _removal_rule(sf: SharefileUser | None) -> Rule:
    if sf is None:
        return Rule.ABSENT_FROM_SHAREFILE
    if not sf.is_employee:
        return Rule.SHAREFILE_USER_IS_CLIENT
    return Rule.EMPLOYEE_DISABLED


def _item(action: Action, sm: SmUser, key: str, sf: SharefileUser | None, rule: Rule) -> PlanItem:
    # Built from already-validated records: skip re-validating tens of thousands of items.
    return PlanItem.model_construct(
        action=action,
        user_id=sm.id,
        email=sm.email or sm.username,
        rule=rule,
        match_key=key,
        sm_state=sm.state,
        sharefile_user_id=sf.id if sf is not None else None,
    )


def _by_key_then_id(item: PlanItem) -> tuple[str, str]:
    return (item.match_key, item.user_id)


def _display_name(sf: SharefileUser) -> str | None:
    name = " ".join(part for part in (sf.first_name, sf.last_name) if part)
    return name or None
