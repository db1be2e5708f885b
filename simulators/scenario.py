"""Scenario files: the customers, users and employees the simulators serve, and how to load them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from domain.errors import ConfigError

DEMO_SCENARIO_PATH: Path = Path(__file__).parent / "scenarios" / "demo.json"

SM_STATES = frozenset(
    {"not_provisioned", "provisioned", "provisioning", "deprovisioning", "failed"}
)


class ScenarioCustomer(BaseModel):
    """One customer: its Services Manager users and its ShareFile account's users."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    name: str
    sharefile_enabled: bool = True
    subdomain: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    # Exactly the SM contract's user objects: {"id", "username", "email", "display_name",
    # "enabled", "sharefile": {"state", "updated_at"}}; served as they are.
    sm_users: list[dict[str, Any]]
    # Exactly ShareFile OData Contact items ("Id", "Email", "FirstName", ...); served as they are.
    sharefile_employees: list[dict[str, Any]]
    sharefile_clients: list[dict[str, Any]] = []

    @field_validator("sm_users")
    @classmethod
    def _sm_users_are_contract_objects(cls, users: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Only what the simulator itself relies on is checked: an id to address the user by and
        # a known state to transition from. Everything else is served verbatim.
        seen: set[str] = set()
        for position, user in enumerate(users):
            user_id = user.get("id")
            if not isinstance(user_id, str) or not user_id:
                raise ValueError(f"sm_users[{position}] has no string 'id'")
            if user_id in seen:
                raise ValueError(f"sm_users[{position}] repeats id {user_id!r}")
            seen.add(user_id)
            service = user.get("sharefile")
            state = service.get("state") if isinstance(service, dict) else None
            if state not in SM_STATES:
                raise ValueError(
                    f"sm_users[{position}] ({user_id}) has sharefile.state {state!r}; "
                    f"expected one of {', '.join(sorted(SM_STATES))}"
                )
        return users

    @field_validator("sharefile_employees", "sharefile_clients")
    @classmethod
    def _contacts_have_ids(cls, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for position, contact in enumerate(contacts):
            if not isinstance(contact.get("Id"), str) or not contact["Id"]:
                raise ValueError(f"item {position} has no string 'Id'")
        return contacts


class Scenario(BaseModel):
    """A whole fleet: its customers, the credentials both simulators accept, the ground truth."""

    model_config = ConfigDict(extra="forbid")

    customers: list[ScenarioCustomer]
    sm_token: str = "sim-sm-token"
    # Accepted for every subdomain: the simulator plays one ShareFile tenant per customer.
    sharefile_credentials: dict[str, str] = {
        "client_id": "sfsync-sim",
        "client_secret": "sim-client-secret",
        "username": "api@sim.example",
        "password": "sim-password",
    }
    # customer_id -> user_id -> the SM sharefile.state expected after one sync cycle with the
    # default policy; None when nobody computed it (hand-written files usually).
    expected: dict[str, dict[str, str]] | None = None

    @model_validator(mode="after")
    def _customers_are_addressable(self) -> Scenario:
        ids: set[str] = set()
        subdomains: set[str] = set()
        for customer in self.customers:
            if customer.id in ids:
                raise ValueError(f"customer id {customer.id!r} appears twice")
            # The ShareFile simulator routes by subdomain, so two customers cannot share one.
            if customer.subdomain.lower() in subdomains:
                raise ValueError(f"subdomain {customer.subdomain!r} appears twice")
            ids.add(customer.id)
            subdomains.add(customer.subdomain.lower())
        wrong_keys = set(self.sharefile_credentials) ^ {
            "client_id",
            "client_secret",
            "username",
            "password",
        }
        if wrong_keys:
            raise ValueError(
                "sharefile_credentials needs exactly client_id, client_secret, username, password"
            )
        return self


def _first_error(error: ValidationError) -> str:
    """One line: where the first problem is, what it is, and how many more there are."""
    errors = error.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def load_scenario(path: str | Path) -> Scenario:
    """Read a .json, .yaml or .yml scenario; ConfigError names the file and what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".json", ".yaml", ".yml"}:
        raise ConfigError(f"scenario file {path}: unsupported extension (use .json, .yaml or .yml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"scenario file {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"scenario file {path}: cannot be read ({error})") from None
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"scenario file {path}: invalid JSON at line {error.lineno} column {error.colno}: "
            f"{error.msg}"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"scenario file {path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"scenario file {path}: expected an object with 'customers' at the top level, "
            f"found {type(data).__name__}"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"scenario file {path}: {_first_error(error)}") from None
