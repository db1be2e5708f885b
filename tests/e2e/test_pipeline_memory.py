"""A whole sync cycle on the embedded broker ends in the generator's expected state."""

from __future__ import annotations

from domain.report import Outcome
from sfsync.oneshot import sync_once
from tests.e2e.conftest import settings_for


def test_one_cycle_brings_services_manager_to_the_expected_state(
    start_fleet, fleet, tmp_path
) -> None:
    sims = start_fleet()
    result = sync_once(settings_for(sims, tmp_path), timeout_s=120)
    enabled = [c.id for c in fleet.customers if c.sharefile_enabled]
    assert sorted(result.reports) == sorted(enabled)
    assert not result.failed and not result.failed_requests
    assert sims.sm_states() == fleet.expected
    assert sims.duplicate_effective_submissions() == 0


def test_a_second_cycle_finds_nothing_left_to_do(start_fleet, tmp_path) -> None:
    sims = start_fleet()
    settings = settings_for(sims, tmp_path)
    sync_once(settings, timeout_s=120)
    again = sync_once(settings, timeout_s=120)
    assert all(
        r.counts["provision"] == r.counts["deprovision"] == 0 for r in again.reports.values()
    )
    assert not again.answers


def test_dry_run_reports_the_plan_and_changes_nothing(start_fleet, tmp_path) -> None:
    sims = start_fleet()
    before = sims.sm_states()
    result = sync_once(settings_for(sims, tmp_path), dry_run=True, timeout_s=120)
    assert sims.sm_states() == before
    assert sims.submissions() == []
    assert all(r.dry_run and r.outcome is Outcome.COMPLETED for r in result.reports.values())
    assert sum(r.counts["provision"] + r.counts["deprovision"] for r in result.reports.values()) > 0


def test_only_the_given_customers_are_synced(start_fleet, fleet, tmp_path) -> None:
    sims = start_fleet()
    chosen = [c.id for c in fleet.customers if c.sharefile_enabled][:2]
    result = sync_once(settings_for(sims, tmp_path), customer_ids=chosen, timeout_s=60)
    assert sorted(result.reports) == sorted(chosen)
    assert {s["customer_id"] for s in sims.submissions()} <= set(chosen)


def test_a_held_plan_goes_out_only_when_that_exact_plan_is_approved(start_fleet, tmp_path) -> None:
    from simulators import DEMO_SCENARIO_PATH, load_scenario

    demo = load_scenario(DEMO_SCENARIO_PATH)
    sims = start_fleet(demo)
    settings = settings_for(sims, tmp_path)
    first = sync_once(settings, timeout_s=60)
    [held] = [r for r in first.reports.values() if r.outcome is Outcome.HELD]
    before = sims.sm_states()[held.customer_id]
    assert held.held and not held.deprovision

    wrong = sync_once(
        settings, customer_ids=[held.customer_id], approved_plan_id="plan-0", timeout_s=60
    )
    assert wrong.reports[held.customer_id].outcome is Outcome.HELD
    assert sims.sm_states()[held.customer_id] == before

    approved = sync_once(
        settings, customer_ids=[held.customer_id], approved_plan_id=held.plan_id, timeout_s=60
    )
    report = approved.reports[held.customer_id]
    assert report.outcome is Outcome.COMPLETED and report.approved
    removed = {item.user_id for item in held.held}
    after = sims.sm_states()[held.customer_id]
    assert {u for u, s in after.items() if s != before[u]} == removed
    assert all(after[u] == "not_provisioned" for u in removed)
