"""The reconcile policy and the safety guard that holds dangerous removals for an operator."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class DisabledEmployees(StrEnum):
    """What a disabled ShareFile employee means for their Services Manager service."""

    KEEP = "keep"  # still an employee: disabling does not free the ShareFile licence
    DEPROVISION = "deprovision"


class HoldCode(StrEnum):
    SOURCE_EMPTY = "source_empty"
    SOURCE_INCOMPLETE = "source_incomplete"
    SOURCE_UNMATCHABLE = "source_unmatchable"
    TOO_MANY_DEPROVISIONS = "too_many_deprovisions"
    DEPROVISION_RATIO = "deprovision_ratio"


class HoldReason(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    code: HoldCode
    message: str


class SafetyGuard(BaseModel):
    """Holds every removal of a plan that looks like an accident rather than a change.

    Modelled on Entra ID's accidental-deletion prevention: one threshold in users, one in share of
    the provisioned users, and checks that the ShareFile side answered in full and in a shape
    that can be matched (most employees carry a usable e-mail). The share is taken of at least
    `ratio_floor` users: a customer with fewer may lose max_deprovision_ratio x ratio_floor users
    (4 by default) in a run without a hold, so that a five-user customer can lose two, while one
    of 19 that would lose 18 is held like any other.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_deprovision: int = Field(default=25, ge=0)
    max_deprovision_ratio: float = Field(default=0.2, ge=0.0, le=1.0)
    ratio_floor: int = Field(default=20, ge=0)

    def check(
        self,
        *,
        deprovisions: int,
        provisioned: int,
        employees_received: int,
        employees_declared: int | None,
        employees_matchable: int | None = None,
        employees_repeated: int = 0,
        absent_removals: int | None = None,
        sm_users_repeated: int = 0,
    ) -> tuple[HoldReason, ...]:
        """Every reason to hold the removals of a plan; empty when they may go out."""
        if deprovisions == 0:
            return ()
        reasons: list[HoldReason] = []
        if employees_received == 0 and provisioned > 0:
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_EMPTY,
                    message=(
                        f"ShareFile returned no employees while {provisioned} users are "
                        "provisioned in Services Manager"
                    ),
                )
            )
        matchable = employees_received if employees_matchable is None else employees_matchable
        if employees_received > 0 and matchable * 2 < employees_received:
            # Most employees without an address is a broken feed (a renamed field, an ignored
            # $select), not a company whose staff lost their e-mail: nobody would match.
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_UNMATCHABLE,
                    message=(
                        f"only {matchable} of {employees_received} ShareFile employees have "
                        "a usable e-mail address"
                    ),
                )
            )
        elif matchable < employees_received and (
            deprovisions if absent_removals is None else absent_removals
        ):
            # A few employees that cannot be matched: a user removed as absent from ShareFile
            # may be one of them (an address with an invisible character, say). Never guessed.
            unmatchable = employees_received - matchable
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_UNMATCHABLE,
                    message=(
                        f"{unmatchable} ShareFile employee(s) have no usable e-mail address, "
                        "and a user removed as absent from ShareFile may be one of them"
                    ),
                )
            )
        if employees_declared is not None and employees_received < employees_declared:
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_INCOMPLETE,
                    message=(
                        f"ShareFile declared {employees_declared} employees but returned "
                        f"{employees_received}"
                        + (
                            f" ({employees_repeated} more listed twice)"
                            if employees_repeated
                            else ""
                        )
                    ),
                )
            )
        elif employees_repeated:
            # Pages read while the account changed: whoever moved across a page boundary may
            # be missing, even where the count adds up (or none was declared).
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_INCOMPLETE,
                    message=(
                        f"ShareFile listed {employees_repeated} employees twice: the account "
                        "changed while its pages were read, and others may be missing"
                    ),
                )
            )
        if sm_users_repeated:
            # Services Manager's pages changed while read: its counts (the ratio's base) and
            # users are not one consistent list.
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_INCOMPLETE,
                    message=(
                        f"Services Manager listed {sm_users_repeated} users twice: its pages "
                        "changed while they were read"
                    ),
                )
            )
        if deprovisions > self.max_deprovision:
            reasons.append(
                HoldReason(
                    code=HoldCode.TOO_MANY_DEPROVISIONS,
                    message=(
                        f"{deprovisions} deprovisions exceed max_deprovision={self.max_deprovision}"
                    ),
                )
            )
        base = max(provisioned, self.ratio_floor)
        if base > 0 and deprovisions / base > self.max_deprovision_ratio:
            share = (
                f"{deprovisions / provisioned:.0%}"
                if provisioned >= self.ratio_floor
                else f"taken of at least ratio_floor={self.ratio_floor} users: "
                f"{deprovisions / base:.0%}"
            )
            reasons.append(
                HoldReason(
                    code=HoldCode.DEPROVISION_RATIO,
                    message=(
                        f"{deprovisions} of {provisioned} provisioned users ({share}) "
                        f"exceed max_deprovision_ratio={self.max_deprovision_ratio:.0%}"
                    ),
                )
            )
        return tuple(reasons)


class Policy(BaseModel):
    """Everything reconcile needs to know besides the two user sets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    disabled_employees: DisabledEmployees = DisabledEmployees.KEEP
    guard: SafetyGuard = SafetyGuard()
    # An operator's approval of one held plan's removals: they go out only if the new plan's
    # removals are exactly these (`plan.removals_id`; or the new plan has exactly this id), i.e.
    # no removal changed since the operator looked at them. Provisions are never held.
    approved_plan_id: str | None = None
