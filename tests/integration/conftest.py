"""Fixtures that start the loopback simulators over small scenarios and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from simulators import Scenario, ScenarioCustomer, SimulatorServers

UPDATED_AT = "2026-11-20T10:00:00Z"
ALPHA_EMPLOYEES = 1234  # three pages of 500


def sm_user(user_id: str, email: str, state: str, *, enabled: bool = True) -> dict[str, Any]:
    """One SM contract user object."""
    return {
        "id": user_id,
        "username": email.lower(),
        "email": email,
        "display_name": email.split("@")[0].replace(".", " ").title(),
        "enabled": enabled,
        "sharefile": {"state": state, "updated_at": UPDATED_AT},
    }


def contact(
    subdomain: str, number: int, email: str | None, *, disabled: bool = False
) -> dict[str, Any]:
    """One ShareFile OData Contact item."""
    contact_id = f"{number:08x}-0000-4000-8000-{number:012x}"
    return {
        "odata.type": "ShareFile.Api.Models.Contact",
        "Id": contact_id,
        "url": f"https://{subdomain}.sf-api.com/sf/v3/Contacts({contact_id})",
        "Email": email,
        "Name": f"Employee, Number {number}",
        "FirstName": "Number",
        "LastName": f"Employee {number}",
        "IsDisabled": disabled,
    }


def build_small_scenario(*, alpha_employees: int = ALPHA_EMPLOYEES) -> Scenario:
    """Two customers: `cust-alpha` has one SM user per state worth testing and many employees."""
    alpha_users = [
        sm_user("u-prov", "Prov.User@Alpha.example", "provisioned"),
        sm_user("u-new", "New.User@Alpha.example", "not_provisioned"),
        sm_user("u-failed", "Failed.User@Alpha.example", "failed"),
        sm_user("u-disabled", "Disabled.User@Alpha.example", "not_provisioned", enabled=False),
        sm_user("u-flight", "Flight.User@Alpha.example", "provisioning"),
    ] + [sm_user(f"u-{n:04d}", f"user{n}@alpha.example", "provisioned") for n in range(20)]
    alpha_employees_items = [
        contact("alpha", n, f"employee{n}@alpha.example") for n in range(alpha_employees)
    ]
    return Scenario(
        customers=[
            ScenarioCustomer(
                id="cust-alpha",
                name="Alpha Ltd",
                subdomain="alpha",
                sm_users=alpha_users,
                sharefile_employees=alpha_employees_items,
                sharefile_clients=[contact("alpha", 90_000, "client@partner.example")],
            ),
            ScenarioCustomer(
                id="cust-beta",
                name="Beta GmbH",
                subdomain="beta",
                sm_users=[sm_user("u-b1", "one@beta.example", "provisioned")],
                sharefile_employees=[contact("beta", 1, "one@beta.example")],
            ),
            ScenarioCustomer(
                id="cust-off",
                name="Off Inc",
                sharefile_enabled=False,
                subdomain="off",
                sm_users=[],
                sharefile_employees=[],
            ),
        ]
    )


@pytest.fixture(scope="session")
def build_scenario() -> Callable[..., Scenario]:
    """build_scenario(alpha_employees=N): the small scenario with another number of employees."""
    return build_small_scenario


@pytest.fixture(scope="session")
def small_scenario() -> Scenario:
    # Read-only for the simulators (they keep changed states aside), so one per session is safe.
    return build_small_scenario()


@pytest.fixture
def start_simulators() -> Iterator[Callable[..., SimulatorServers]]:
    """start_simulators(scenario, **SimulatorServers kwargs) -> started servers, stopped after."""
    started: list[SimulatorServers] = []

    def start(scenario: Scenario, **kwargs: Any) -> SimulatorServers:
        servers = SimulatorServers(scenario, **kwargs)
        servers.start()
        started.append(servers)
        return servers

    yield start
    for servers in reversed(started):
        servers.stop()


@pytest.fixture
def simulators(
    start_simulators: Callable[..., SimulatorServers], small_scenario: Scenario
) -> SimulatorServers:
    """Both simulators, started over the small scenario with default settings."""
    return start_simulators(small_scenario)
