"""The pure core of sfsync: records, matching, the reconcile planner, safety guard, messages."""

from domain.errors import ConfigError, InvalidMessage, PermanentError, SfsyncError, TransientError
from domain.matching import normalise_email
from domain.plan import Plan
from domain.policy import DisabledEmployees, Policy, SafetyGuard
from domain.reconcile import reconcile
from domain.records import SharefileState, SharefileUser, SmUser

__all__ = [
    "ConfigError",
    "DisabledEmployees",
    "InvalidMessage",
    "PermanentError",
    "Plan",
    "Policy",
    "SafetyGuard",
    "SfsyncError",
    "SharefileState",
    "SharefileUser",
    "SmUser",
    "TransientError",
    "normalise_email",
    "reconcile",
]
