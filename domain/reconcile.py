"""reconcile(): the pure planner that turns two user sets and a policy into a Plan."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TypeVar, cast

from domain.matching import normalise_email, sharefile_user_key, sm_user_key
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
    removals_id,
)
from domain.policy import DisabledEmployees, Policy
from domain.records import SharefileState, SharefileUser, SmUser

_IN_FLIGHT = frozenset({SharefileState.PROVISIONING, SharefileState.DEPROVISIONING})
_is_employee = attrgetter("is_employee")
_id = attrgetter("id")
_T = TypeVar("_T")


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

    ShareFile's side is read first and indexed; Services Manager's side is then read once, one
    user at a time, and not kept: pass a generator (a paged API stream) and a customer with a
    million users costs the ShareFile records plus a small key -> id map, not both sides' records.
    """
    policy = policy or Policy()
    skipped: list[Skipped] = []
    sf_index, sf_duplicates, employees, unmatchable, repeated = _index_sharefile(
        sharefile_users, skipped
    )

    # Services Manager, streamed. Every keyed user not on a conflicted key has exactly one
    # outcome: one entry (with its key) in one of the lists below, or none, which is "in sync".
    sm_first: dict[str, str] = {}  # match key -> id of the first SM user on it
    sm_duplicates: dict[str, list[str]] = {}  # match key -> ids of every SM user on it
    # Every SM user read, with the state of its first listing (provisioned, once any listing
    # says so). A user listed again (a cursor that replayed a page, perhaps after the user
    # changed) is counted once; under another key, or in another state, each of its keys is a
    # conflict: which listing is current is unknown, so nothing is done on them. (Not compared,
    # to keep one small value per user: the same key spelt another way, and `enabled`. There the
    # first listing is the one reported, or provisioned; removals are held all the same.)
    sm_seen: dict[str, SharefileState] = {}
    sm_ambiguous: set[str] = set()  # keys of SM users whose listings disagree
    relisted_elsewhere: set[str] = set()  # ids listed again under another key (or none)
    keyless: dict[str, tuple[int, str | None]] = {}  # SM users listed without a key (`_keyless`)
    acted: set[str] = set()  # keys whose first user got a list entry (not "in sync")
    provision: list[PlanItem] = []
    deprovision: list[PlanItem] = []
    pending: list[tuple[str, Pending]] = []
    skipped_keyed: list[tuple[str, Skipped]] = []
    sm_count = 0
    sm_repeated = 0
    provisioned_before = 0
    keep_disabled = policy.disabled_employees is DisabledEmployees.KEEP
    provisioned = SharefileState.PROVISIONED
    find = sf_index.get
    seen = sm_seen.get

    for sm in sm_users:
        sm_count += 1
        state = sm.state
        if state is provisioned:
            provisioned_before += 1
        # An address is often already some ShareFile user's key, and an ASCII string that is a
        # key normalises to itself: found as it is, it needs no sm_user_key, whose
        # normalise_email (twice per matched user) was half of reconcile's instructions. The
        # lookup comes first: an address not found as it is costs one dict miss more.
        email = sm.email
        key: str | None
        if email is not None and (sf := find(email)) is not None and email.isascii():
            key = email
        else:
            sf = None
            key = sm_user_key(sm)
        first_state = seen(sm.id)
        if first_state is not None:
            # Listed before: counted once, and the guard holds removals planned from a list
            # that changed while it was read. Provisioned if any listing says so.
            sm_repeated += 1
            sm_count -= 1
            if state is provisioned:
                if first_state is provisioned:
                    provisioned_before -= 1
                else:
                    sm_seen[sm.id] = provisioned
            if key is None and sm.id in keyless:
                _keyless(sm, keyless, skipped)
                continue
            on_this_key = key is not None and (
                sm_first.get(key) == sm.id or sm.id in sm_duplicates.get(key, ())
            )
            if not on_this_key:
                # Under another address (or none) than before: which is current is unknown.
                relisted_elsewhere.add(sm.id)
                if key is not None:
                    first = sm_first.setdefault(key, sm.id)
                    if first != sm.id:
                        sm_duplicates.setdefault(key, [first]).append(sm.id)
            if key is not None and (not on_this_key or first_state is not state):
                sm_ambiguous.add(key)  # its outcome, and the first listing's, are taken back
            continue
        sm_seen[sm.id] = state
        if key is None:
            _keyless(sm, keyless, skipped)
            continue
        if sf is None:
            sf = find(key)
        if sf is not None and sf.email == key:
            key = sf.email  # the same text: keep ShareFile's string object, not a second copy
        if key in sm_first:
            # A second user on this key: a conflict. The first user's outcome is dropped below.
            sm_duplicates.setdefault(key, [sm_first[key]]).append(sm.id)
            continue
        sm_first[key] = sm.id
        if key in sf_duplicates:
            continue
        sf_id = sf.id if sf is not None else None
        if state in _IN_FLIGHT:
            pending.append(
                (key, Pending(user_id=sm.id, email=sm.email, state=state, sharefile_user_id=sf_id))
            )
            acted.add(key)
            continue
        entitled = sf is not None and sf.is_employee and (keep_disabled or not sf.is_disabled)
        if state is provisioned:
            if entitled:
                continue
            if sf is None and _username_is_an_employee(sm, key, sf_index, sf_duplicates):
                skip = Skipped(
                    reason=SkipReason.SM_USERNAME_IS_AN_EMPLOYEE, user_id=sm.id, email=sm.email
                )
                skipped_keyed.append((key, skip))
            else:
                deprovision.append(_item(Action.DEPROVISION, sm, key, sf, _removal_rule(sf)))
        elif entitled:
            if not sm.enabled:
                skip = Skipped(
                    reason=SkipReason.SM_USER_DISABLED,
                    user_id=sm.id,
                    sharefile_user_id=sf_id,
                    email=sm.email,
                )
                skipped_keyed.append((key, skip))
            else:
                rule = (
                    Rule.RETRY_AFTER_FAILURE
                    if state is SharefileState.FAILED
                    else Rule.EMPLOYEE_WITHOUT_SERVICE
                )
                provision.append(_item(Action.PROVISION, sm, key, sf, rule))
        elif state is SharefileState.FAILED:
            # The failed request may have been a removal: the user may still hold an account.
            skip = Skipped(
                reason=SkipReason.PREVIOUS_REQUEST_FAILED,
                user_id=sm.id,
                sharefile_user_id=sf_id,
                email=sm.email,
            )
            skipped_keyed.append((key, skip))
        else:
            continue
        acted.add(key)

    if relisted_elsewhere:
        # The keys the users listed again elsewhere had when first listed: conflicts too, and
        # the users are reported there, not as users without a usable address.
        sm_ambiguous.update(k for k, i in sm_first.items() if i in relisted_elsewhere)
        sm_ambiguous.update(
            k for k, ids in sm_duplicates.items() if not relisted_elsewhere.isdisjoint(ids)
        )
        in_conflicts = {i for k in sm_ambiguous for i in sm_duplicates.get(k) or (sm_first[k],)}
        skipped = [s for s in skipped if s.user_id not in in_conflicts]
    conflicted = sm_duplicates.keys() | sf_duplicates.keys() | sm_ambiguous
    # In sync: the first users on unconflicted keys that got no list entry.
    in_sync = len(sm_first) - sum(key in sm_first for key in conflicted) - len(acted - conflicted)
    conflicts = [
        Conflict(
            match_key=key,
            sm_user_ids=tuple(sorted(sm_duplicates.get(key) or _one(sm_first.get(key)))),
            sharefile_user_ids=tuple(
                sorted(u.id for u in sf_duplicates.get(key) or _one(sf_index.get(key)))
            ),
        )
        for key in sorted(conflicted)
    ]
    if sm_duplicates or sm_ambiguous:
        # SF-side conflicts were never acted on; SM-side ones are taken back here.
        provision = [i for i in provision if i.match_key not in conflicted]
        deprovision = [i for i in deprovision if i.match_key not in conflicted]
    skipped.extend(s for key, s in skipped_keyed if key not in conflicted)

    unmatched = [
        Unmatched(
            sharefile_user_id=sf.id,
            email=sf.email or key,
            match_key=key,
            name=_display_name(sf),
            is_disabled=sf.is_disabled,
        )
        for key in sf_index.keys() - sm_first.keys()
        if (sf := sf_index[key]).is_employee and key not in conflicted
    ]

    provision.sort(key=_by_key_then_id)
    deprovision.sort(key=_by_key_then_id)
    in_flight = sorted((p for key, p in pending if key not in conflicted), key=_by_user_id)
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
        employees_repeated=repeated,
        sm_users_repeated=sm_repeated,
        absent_removals=sum(item.rule is Rule.ABSENT_FROM_SHAREFILE for item in intended),
    )
    # The approval of a held plan names its removals alone (its provisions went out with it);
    # one naming this whole plan is honoured too.
    approved = bool(reasons) and policy.approved_plan_id in (
        plan_id,
        removals_id(customer_id, intended),
    )
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
        pending=tuple(in_flight),
        skipped=tuple(skipped),
        in_sync=in_sync,
        sm_users=sm_count,
        sharefile_employees=employees,
        sharefile_declared=sharefile_declared,
        provisioned_before=provisioned_before,
    )


def _index_sharefile(
    users: Iterable[SharefileUser], skipped: list[Skipped]
) -> tuple[dict[str, SharefileUser], dict[str, list[SharefileUser]], int, int, int]:
    """Index ShareFile's users by match key: (index, duplicates, employees, unmatchable,
    repeated).

    The common case (every user has a usable, distinct address) runs as C-level map/zip/dict,
    with no Python loop per user; unusable addresses and shared keys take a slower exact path.
    An index key is the user's own e-mail string whenever that is already normalised.
    A user listed more than once (the same id: the account changed while its pages were read,
    so others may be missing) is indexed once, and the employee listings repeated are counted for
    the guard instead of as employees. If its listings disagree (two addresses, employee or
    client, disabled or not), nobody can tell which is current (`_listed_once`): it is reported
    as a conflict on every address it was listed under, so nobody on those is touched.
    """
    records = list(users)
    relisted = _Relisted()
    if len(set(map(_id, records))) != len(records):  # C-level; the set is dropped at once
        records, relisted = _listed_once(records)
    keys = list(map(sharefile_user_key, records))
    employees = sum(map(_is_employee, records)) + relisted.employees
    unmatchable = relisted.unmatchable
    if keys.count(None):
        keyed: list[tuple[str, SharefileUser]] = []
        for key, record in zip(keys, records, strict=True):
            if key is not None:
                keyed.append((key, record))
            elif record.is_employee:
                unmatchable += 1
                skipped.append(
                    Skipped(
                        reason=SkipReason.SHAREFILE_USER_WITHOUT_EMAIL,
                        sharefile_user_id=record.id,
                        email=record.email,
                    )
                )
        keys, records = [key for key, _ in keyed], [record for _, record in keyed]
    usable = cast("list[str]", keys)  # no None left
    index = dict(zip(usable, records, strict=True))
    duplicates: dict[str, list[SharefileUser]] = {}
    if len(index) != len(usable):
        index = {}
        for key, record in zip(usable, records, strict=True):
            first = index.setdefault(key, record)
            if first is not record:
                duplicates.setdefault(key, [first]).append(record)
    for key, listing in relisted.conflicting:
        on_key = duplicates.get(key)
        if on_key is None:
            on_key = duplicates[key] = _one(index.get(key))
        on_key.append(listing)
    return index, duplicates, employees, unmatchable, relisted.repeated


@dataclass
class _Relisted:
    """What `_listed_once` found among the users listed more than once."""

    repeated: int = 0  # employee listings beyond one per user
    employees: int = 0  # users with disagreeing listings, one of them an employee's
    unmatchable: int = 0  # of those, the ones with an employee listing without a usable address
    conflicting: list[tuple[str, SharefileUser]] = field(default_factory=list)  # (key, listing)


def _listed_once(records: list[SharefileUser]) -> tuple[list[SharefileUser], _Relisted]:
    """The users to index, one record per ShareFile id, and what the repeats were.

    Nothing here depends on where the feed put a listing, so that the plan does not depend on
    the pages' order. Listings that agree on what the plan reads (the address's match key,
    employee or client, disabled or not) are one user, kept by content: an employee listing
    first, then by address and names. Listings that disagree are not indexed: each address they
    give is a conflict, with one listing per address (an employee's first), and the user counts
    as an employee if any listing says so, and as one without a usable address if an employee
    listing has none. Only when no listing has a usable address is the user indexed as usual
    (and skipped as one without a usable address, if an employee).
    """
    listings: dict[str, list[SharefileUser]] = {}
    for record in records:
        listings.setdefault(record.id, []).append(record)
    kept: list[SharefileUser] = []
    relisted = _Relisted()
    for listed in listings.values():
        if len(listed) == 1:
            kept.append(listed[0])
            continue
        employee_listings = sum(map(_is_employee, listed))
        relisted.repeated += employee_listings - (employee_listings > 0)
        keyed = sorted(
            ((sharefile_user_key(user), user) for user in listed),
            key=lambda pair: (pair[0] or "", _by_content(pair[1])),
        )
        views = {(key, user.is_employee, user.is_disabled) for key, user in keyed}
        if len(views) == 1 or all(key is None for key, _ in keyed):
            kept.append(min(listed, key=_by_content))
            continue
        first_on_key: dict[str, SharefileUser] = {}
        for key, user in keyed:
            if key is not None:
                first_on_key.setdefault(key, user)
        relisted.conflicting.extend(first_on_key.items())
        relisted.employees += employee_listings > 0
        relisted.unmatchable += any(key is None and user.is_employee for key, user in keyed)
    return kept, relisted


def _by_content(user: SharefileUser) -> tuple[bool, bool, str, bool, str, str]:
    return (
        not user.is_employee,
        user.email is None,
        user.email or "",
        user.is_disabled,
        user.first_name or "",
        user.last_name or "",
    )


def _username_is_an_employee(
    sm: SmUser,
    key: str,
    index: dict[str, SharefileUser],
    duplicates: dict[str, list[SharefileUser]],
) -> bool:
    """Whether an SM user about to be removed as absent (its `key` matched nobody) has a username
    that is the address of a ShareFile employee: then the e-mail is the stale one, most likely.

    An address ShareFile lists more than once counts if any of its users is an employee, so the
    answer does not depend on which of them the feed gave first.
    """
    other = normalise_email(sm.username) if sm.username else None
    if other is None or other == key or (other not in index and other not in duplicates):
        return False
    return any(user.is_employee for user in duplicates.get(other) or (index[other],))


def _keyless(
    sm: SmUser, keyless: dict[str, tuple[int, str | None]], skipped: list[Skipped]
) -> None:
    """An SM user listed without a usable key: skipped if it has (or may have) the service, by
    any of its listings; never guessed at, never removed. A user listed so more than once is
    skipped once, under the first of its addresses in text order (not the feed's order)."""
    at, email = keyless.get(sm.id, (-1, sm.email))
    if (sm.email is None, sm.email or "") < (email is None, email or ""):
        email = sm.email
    if at < 0 and sm.state is not SharefileState.NOT_PROVISIONED:
        at = len(skipped)
        skipped.append(Skipped(reason=SkipReason.SM_USER_WITHOUT_EMAIL, user_id=sm.id, email=email))
    elif at >= 0 and skipped[at].email != email:
        skipped[at] = skipped[at].model_copy(update={"email": email})
    keyless[sm.id] = (at, email)


def _one(value: _T | None) -> list[_T]:
    return [] if value is None else [value]


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


def _by_user_id(item: Pending) -> str:
    return item.user_id


def _display_name(sf: SharefileUser) -> str | None:
    name = " ".join(part for part in (sf.first_name, sf.last_name) if part)
    return name or None
