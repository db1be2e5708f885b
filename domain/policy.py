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
    the provisioned users (only once a customer has `ratio_floor` of them, so that a five-user
    customer can lose two), and checks that the ShareFile side answered in full and in a shape
    that can be matched (most employees carry a usable e-mail).
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
        if employees_declared is not None and employees_received < employees_declared:
            reasons.append(
                HoldReason(
                    code=HoldCode.SOURCE_INCOMPLETE,
                    message=(
                        f"ShareFile declared {employees_declared} employees but returned "
                        f"{employees_received}"
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
        if provisioned >= self.ratio_floor and provisioned > 0:
            ratio = deprovisions / provisioned
            if ratio > self.max_deprovision_ratio:
                reasons.append(
                    HoldReason(
                        code=HoldCode.DEPROVISION_RATIO,
                        message=(
                            f"{deprovisions} of {provisioned} provisioned users ({ratio:.0%}) "
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
    # An operator's approval of one held plan: its removals go out only if the new plan has
    # exactly this id, i.e. nothing changed on either side since the operator looked at it.
    approved_plan_id: str | None = None
