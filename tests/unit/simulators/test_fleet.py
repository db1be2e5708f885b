"""generate_fleet: reproducible, heavy-tailed, drifting as asked, and its ground truth holds."""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest

from domain.reconcile import reconcile
from domain.records import SHAREFILE_USER, SM_USER
from simulators import Scenario, ScenarioCustomer, generate_fleet

PENDING = {"provisioning", "deprovisioning"}


def initial_states(customer: ScenarioCustomer) -> dict[str, str]:
    return {user["id"]: user["sharefile"]["state"] for user in customer.sm_users}


def derived_truth(customer: ScenarioCustomer) -> dict[str, str]:
    """The rule stated in generate_fleet's docstring, derived from the data alone."""
    if not customer.sharefile_enabled:
        return initial_states(customer)
    active = {
        employee["Email"].lower()
        for employee in customer.sharefile_employees
        if employee["Email"] and not employee["IsDisabled"]
    }
    truth = {}
    for user in customer.sm_users:
        state = user["sharefile"]["state"]
        if state in PENDING:
            truth[user["id"]] = state
        elif user["enabled"] and user["email"].lower() in active:
            truth[user["id"]] = "provisioned"
        else:
            truth[user["id"]] = "not_provisioned"
    return truth


def removals_and_provisioned(
    customer: ScenarioCustomer, expected: dict[str, str]
) -> tuple[int, int]:
    initial = initial_states(customer)
    provisioned = sum(1 for state in initial.values() if state == "provisioned")
    removals = sum(
        1
        for user_id, state in initial.items()
        if state == "provisioned" and expected[user_id] == "not_provisioned"
    )
    return removals, provisioned


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    first = generate_fleet(40, seed=3)
    assert first == generate_fleet(40, seed=3)
    assert first != generate_fleet(40, seed=4)


def test_customer_sizes_are_heavy_tailed_around_the_median() -> None:
    fleet = generate_fleet(1000, seed=1, median_users=20)
    sizes = [len(customer.sm_users) for customer in fleet.customers]
    median = statistics.median(sizes)
    assert 16 <= median <= 25
    assert statistics.mean(sizes) > 1.4 * median
    assert max(sizes) >= 10 * median
    assert min(sizes) >= 1


def test_max_users_caps_every_customer_but_the_big_one() -> None:
    fleet = generate_fleet(300, seed=2, max_users=60, big_customer_users=1000)
    sizes = [len(customer.sm_users) for customer in fleet.customers]
    assert sizes[0] == 1000
    assert max(sizes[1:]) == 60


def test_drift_is_the_share_of_users_that_change() -> None:
    fleet = generate_fleet(1, seed=5, drift=0.1, guard_safe=False, big_customer_users=20_000)
    assert fleet.expected is not None
    customer = fleet.customers[0]
    initial = initial_states(customer)
    changed = sum(1 for uid, state in fleet.expected[customer.id].items() if initial[uid] != state)
    assert 0.09 <= changed / len(initial) <= 0.11
    assert customer.sharefile_clients, "some leavers moved to Clients"


def test_no_drift_means_nothing_changes() -> None:
    fleet = generate_fleet(50, seed=6, drift=0.0)
    assert fleet.expected is not None
    for customer in fleet.customers:
        assert fleet.expected[customer.id] == initial_states(customer)


def test_expected_follows_from_the_data() -> None:
    fleet = generate_fleet(300, seed=7, drift=0.1)
    assert fleet.expected is not None
    assert set(fleet.expected) == {customer.id for customer in fleet.customers}
    for customer in fleet.customers:
        assert fleet.expected[customer.id] == derived_truth(customer), customer.id
    assert any(not customer.sharefile_enabled for customer in fleet.customers)
    assert fleet.customers[0].sharefile_enabled


def test_expected_agrees_with_one_reconcile_cycle() -> None:
    fleet = generate_fleet(150, seed=8, drift=0.08)
    assert fleet.expected is not None
    for customer in fleet.customers:
        if not customer.sharefile_enabled:
            continue
        sharefile_users = [SHAREFILE_USER.validate_python(e) for e in customer.sharefile_employees]
        sharefile_users += [
            dataclasses.replace(SHAREFILE_USER.validate_python(c), is_employee=False)
            for c in customer.sharefile_clients
        ]
        plan = reconcile(
            [SM_USER.validate_python(u) for u in customer.sm_users],
            sharefile_users,
            customer_id=customer.id,
        )
        assert not plan.held, (customer.id, plan.hold_reasons)
        assert not plan.conflicts
        states = initial_states(customer)
        for item in plan.provision:
            states[item.user_id] = "provisioned"
        for item in plan.deprovision:
            states[item.user_id] = "not_provisioned"
        assert states == fleet.expected[customer.id], customer.id


def test_guard_safe_keeps_removals_within_the_default_guard() -> None:
    fleet = generate_fleet(200, seed=9, drift=0.5, guard_safe=True)
    assert fleet.expected is not None
    for customer in fleet.customers:
        removals, provisioned = removals_and_provisioned(customer, fleet.expected[customer.id])
        assert removals <= 25
        if provisioned >= 20:
            assert removals <= provisioned * 0.2


def test_without_guard_safe_high_drift_exceeds_the_guard() -> None:
    fleet = generate_fleet(200, seed=9, drift=0.5, guard_safe=False)
    assert fleet.expected is not None
    ratios = [
        removals / provisioned
        for customer in fleet.customers
        for removals, provisioned in [
            removals_and_provisioned(customer, fleet.expected[customer.id])
        ]
        if provisioned >= 20
    ]
    assert max(ratios) > 0.2


def test_generated_fleet_passes_the_scenario_schema() -> None:
    fleet = generate_fleet(30, seed=10)
    assert Scenario.model_validate(fleet.model_dump()) == fleet


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="drift"):
        generate_fleet(1, drift=1.0)
    with pytest.raises(ValueError, match="negative"):
        generate_fleet(-1)


@pytest.mark.slow
def test_ten_thousand_customers_in_a_few_seconds() -> None:
    started = time.perf_counter()
    fleet = generate_fleet(10_000, seed=11)
    assert time.perf_counter() - started < 10
    assert len(fleet.customers) == 10_000
    assert len({customer.subdomain for customer in fleet.customers}) == 10_000


@pytest.mark.slow
def test_one_big_customer_of_a_quarter_million_users() -> None:
    started = time.perf_counter()
    fleet = generate_fleet(1, seed=12, big_customer_users=250_000)
    assert time.perf_counter() - started < 10
    assert len(fleet.customers[0].sm_users) == 250_000
    assert fleet.expected is not None and len(fleet.expected["cust-00000"]) == 250_000


def test_large_share_adds_a_few_customers_of_thousands_of_users() -> None:
    plain = generate_fleet(2000, seed=1)
    fleet = generate_fleet(2000, seed=1, large_share=0.002, large_users=(5000, 6000))
    sizes = [len(customer.sm_users) for customer in fleet.customers]
    large = [size for size in sizes if size >= 5000]
    assert 1 <= len(large) <= 12
    assert all(size <= 6000 for size in large)
    assert 16 <= statistics.median(sizes) <= 25
    assert max(len(customer.sm_users) for customer in plain.customers) < 5000
    assert fleet.expected is not None
    assert set(fleet.expected) == {customer.id for customer in fleet.customers}


def test_no_large_share_leaves_the_fleet_as_it_was() -> None:
    assert generate_fleet(30, seed=4, large_share=0.0) == generate_fleet(30, seed=4)
