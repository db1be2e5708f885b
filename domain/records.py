"""The two sides' user records: frozen, validated, and small enough to hold a million of each."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
)
from pydantic.dataclasses import dataclass


class SharefileState(StrEnum):
    """A Services Manager user's ShareFile service state (`sharefile.state` in the SM contract)."""

    NOT_PROVISIONED = "not_provisioned"
    PROVISIONED = "provisioned"
    PROVISIONING = "provisioning"
    DEPROVISIONING = "deprovisioning"
    FAILED = "failed"


def _none_as(default: bool) -> BeforeValidator:
    """Real payloads send `null` for flags they do not know; read it as the field's default."""
    return BeforeValidator(lambda value: default if value is None else value)


def _interned(value: str | None) -> str | None:
    """Share one string object among the many users called John: names repeat, addresses don't."""
    return sys.intern(value) if value is not None else None


Name = Annotated[str | None, AfterValidator(_interned)]


def _feed_decides(value: bool, info: ValidationInfo) -> bool:
    """Whether a ShareFile user is an employee is the feed's to say, never the record's.

    A feed validates its records with the context {"is_employee": <Employees feed?>}, which wins
    over any `is_employee` key a server might put in an item. Without that context (a record
    built or read elsewhere) the value given stands.
    """
    feed = info.context.get("is_employee") if isinstance(info.context, dict) else None
    return feed if isinstance(feed, bool) else value


# A ShareFile user's immutable id, as a feed item gives it ("Id"; "id" taken too). One rule for
# the record and for a second read that parses only ids (adapters.sharefile): both must read the
# same id from the same item, or a present user could look absent.
SharefileId = Annotated[str, Field(min_length=1, validation_alias=AliasChoices("Id", "id"))]

# Unknown fields (odata.type, url, Company, ...) are ignored: both APIs add fields over time.
_RECORD_CONFIG = ConfigDict(extra="ignore", populate_by_name=True)


# Slotted dataclasses rather than BaseModel: a worker may hold 2,000,000 of these at once, and a
# slotted instance is a fraction of a BaseModel's size (no __dict__, no fields-set).
@dataclass(frozen=True, slots=True, config=_RECORD_CONFIG)
class SmUser:
    """A Services Manager user of one customer, with the state of their ShareFile service."""

    id: Annotated[str, Field(min_length=1)]
    state: Annotated[
        SharefileState,
        Field(validation_alias=AliasChoices(AliasPath("sharefile", "state"), "state")),
    ]
    username: str | None = None
    email: str | None = None
    display_name: str | None = None
    enabled: Annotated[bool, _none_as(True)] = True


@dataclass(frozen=True, slots=True, config=_RECORD_CONFIG)
class SharefileUser:
    """A user of a customer's ShareFile account, as its Employees (or Clients) feed lists it."""

    id: SharefileId
    email: Annotated[str | None, Field(validation_alias=AliasChoices("Email", "email"))] = None
    first_name: Annotated[Name, Field(validation_alias=AliasChoices("FirstName", "first_name"))] = (
        None
    )
    last_name: Annotated[Name, Field(validation_alias=AliasChoices("LastName", "last_name"))] = None
    is_disabled: Annotated[
        bool, _none_as(False), Field(validation_alias=AliasChoices("IsDisabled", "is_disabled"))
    ] = False
    # True when the record came from Accounts/Employees; a record from Accounts/Clients is not one.
    is_employee: Annotated[bool, AfterValidator(_feed_decides), Field(validate_default=True)] = True


class Customer(BaseModel):
    """A customer of the service provider, as Services Manager lists it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    name: str | None = None
    sharefile_enabled: Annotated[
        bool,
        _none_as(False),
        Field(
            validation_alias=AliasChoices(AliasPath("sharefile", "enabled"), "sharefile_enabled")
        ),
    ] = False
    subdomain: Annotated[
        str | None,
        Field(validation_alias=AliasChoices(AliasPath("sharefile", "subdomain"), "subdomain")),
    ] = None


class ItemResult(BaseModel):
    """Services Manager's answer for one item of a bulk provisioning request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: str
    action: Literal["provision", "deprovision"]
    status: Literal["accepted", "rejected"]
    error_code: str | None = None
    error_message: str | None = None


class BulkResult(BaseModel):
    """Services Manager's stored answer to one bulk provisioning request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    status: str
    items: tuple[ItemResult, ...]
    # True when Services Manager already had this request_id and answered with the stored result.
    replayed: bool = False


SM_USER = TypeAdapter(SmUser)
SHAREFILE_USER = TypeAdapter(SharefileUser)
