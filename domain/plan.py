"""What reconcile decides for one customer: actions with evidence, and what it left alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from domain.policy import HoldReason
from domain.records import SharefileState


class Action(StrEnum):
    PROVISION = "provision"
    DEPROVISION = "deprovision"


class Rule(StrEnum):
    """Why an action was planned; every item names exactly one."""

    EMPLOYEE_WITHOUT_SERVICE = "employee_without_service"
    RETRY_AFTER_FAILURE = "retry_after_failure"
    ABSENT_FROM_SHAREFILE = "absent_from_sharefile"
    SHAREFILE_USER_IS_CLIENT = "sharefile_user_is_client"
    EMPLOYEE_DISABLED = "employee_disabled"


class SkipReason(StrEnum):
    SM_USER_DISABLED = "sm_user_disabled"
    SM_USER_WITHOUT_EMAIL = "sm_user_without_usable_email"
    SHAREFILE_USER_WITHOUT_EMAIL = "sharefile_user_without_usable_email"
    PREVIOUS_REQUEST_FAILED = "previous_request_failed_and_not_an_employee"
    # Provisioned, and its e-mail matches no employee, but its username (an address) does: a
    # stale e-mail, most likely. Not removed on that guess.
    SM_USERNAME_IS_AN_EMPLOYEE = "sm_username_matches_an_employee"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanItem(_Frozen):
    """One requested change, with the evidence that led to it."""

    action: Action
    user_id: str
    email: str | None
    rule: Rule
    match_key: str
    sm_state: SharefileState
    sharefile_user_id: str | None = None


class Unmatched(_Frozen):
    """A ShareFile employee with no Services Manager user: reported, never acted on."""

    sharefile_user_id: str
    email: str
    match_key: str
    name: str | None = None
    is_disabled: bool = False


class Conflict(_Frozen):
    """Several users on one side share a match key: nobody on that key is touched."""

    match_key: str
    sm_user_ids: tuple[str, ...]
    sharefile_user_ids: tuple[str, ...]


class Pending(_Frozen):
    """A Services Manager user whose request is in flight: not requested again."""

    user_id: str
    email: str | None
    state: SharefileState
    sharefile_user_id: str | None = None


class Skipped(_Frozen):
    reason: SkipReason
    user_id: str | None = None
    sharefile_user_id: str | None = None
    email: str | None = None


class Plan(_Frozen):
    """The outcome of reconcile: what to send, what is held, and what is only reported."""

    plan_id: str
    provision: tuple[PlanItem, ...] = ()
    deprovision: tuple[PlanItem, ...] = ()
    # Deprovisions the safety guard kept back; `hold_reasons` says why.
    held: tuple[PlanItem, ...] = ()
    hold_reasons: tuple[HoldReason, ...] = ()
    approved: bool = False
    unmatched: tuple[Unmatched, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    pending: tuple[Pending, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    in_sync: int = 0
    sm_users: int = 0
    sharefile_employees: int = 0
    sharefile_declared: int | None = None
    provisioned_before: int = 0

    @property
    def is_held(self) -> bool:
        return bool(self.held)

    @property
    def actions(self) -> tuple[PlanItem, ...]:
        """The items to send to Services Manager now, provisions first."""
        return self.provision + self.deprovision

    def counts(self) -> dict[str, int]:
        return {
            "sm_users": self.sm_users,
            "sharefile_employees": self.sharefile_employees,
            "provisioned_before": self.provisioned_before,
            "provision": len(self.provision),
            "deprovision": len(self.deprovision),
            "held": len(self.held),
            "unmatched": len(self.unmatched),
            "conflicts": len(self.conflicts),
            "pending": len(self.pending),
            "skipped": len(self.skipped),
            "in_sync": self.in_sync,
        }


def plan_id_for(
    customer_id: str, provision: tuple[PlanItem, ...], deprovision: tuple[PlanItem, ...]
) -> str:
    """A stable id of a plan's intended actions (before the guard), for an operator to approve."""
    return plan_id_of(
        customer_id,
        [
            (item.action.value, item.user_id, item.rule.value, item.sharefile_user_id)
            for item in provision + deprovision
        ],
    )


def removals_id(customer_id: str, deprovision: tuple[PlanItem, ...]) -> str:
    """The id of the plan these removals alone would make: what an approval of them names.

    A held plan's provisions go out with it, so its re-plan holds only its removals, and has
    this id, not the held plan's. It is the held plan's own id when it had no provisions.
    """
    return plan_id_for(customer_id, (), deprovision)


def plan_id_of(customer_id: str, items: Iterable[tuple[str, str, str, str | None]]) -> str:
    """`plan_id_for` over (action, user id, rule, ShareFile user id) rows, in the plan's order:
    the audit trail's rows of a report give the id of its plan (or of its removals) again."""
    content = {"customer_id": customer_id, "items": [list(item) for item in items]}
    digest = hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()
    return f"plan-{digest[:32]}"
