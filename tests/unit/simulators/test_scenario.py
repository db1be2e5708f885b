"""load_scenario: the demo file, YAML, and a clear one-line ConfigError for every broken file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.errors import ConfigError
from domain.reconcile import reconcile
from domain.records import SHAREFILE_USER, SM_USER
from simulators import DEMO_SCENARIO_PATH, Scenario, load_scenario


def minimal() -> dict[str, Any]:
    return {
        "customers": [
            {
                "id": "cust-1",
                "name": "One Ltd",
                "subdomain": "one",
                "sm_users": [
                    {
                        "id": "u-1",
                        "username": "a@one.example",
                        "email": "A@One.example",
                        "display_name": "A",
                        "enabled": True,
                        "sharefile": {"state": "provisioned", "updated_at": "2026-01-01T00:00:00Z"},
                    }
                ],
                "sharefile_employees": [{"Id": "sf-1", "Email": "a@one.example"}],
            }
        ]
    }


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_demo_scenario_loads_with_eight_customers_and_its_ground_truth() -> None:
    demo = load_scenario(DEMO_SCENARIO_PATH)
    assert len(demo.customers) == 8
    assert [c.id for c in demo.customers if not c.sharefile_enabled] == ["cust-0008"]
    assert demo.expected is not None
    assert set(demo.expected) == {c.id for c in demo.customers}
    for customer in demo.customers:
        assert set(demo.expected[customer.id]) == {u["id"] for u in customer.sm_users}


def test_demo_ground_truth_agrees_with_the_domain_reconcile() -> None:
    """Apply one reconcile plan per synchronised customer; the result must be `expected`."""
    demo = load_scenario(DEMO_SCENARIO_PATH)
    assert demo.expected is not None
    for customer in demo.customers:
        states = {u["id"]: u["sharefile"]["state"] for u in customer.sm_users}
        if customer.sharefile_enabled:
            sharefile_users = [
                SHAREFILE_USER.validate_python(e) for e in customer.sharefile_employees
            ]
            sharefile_users += [
                dataclasses.replace(SHAREFILE_USER.validate_python(c), is_employee=False)
                for c in customer.sharefile_clients
            ]
            plan = reconcile(
                [SM_USER.validate_python(u) for u in customer.sm_users],
                sharefile_users,
                customer_id=customer.id,
            )
            for item in plan.provision:
                states[item.user_id] = "provisioned"
            for item in plan.deprovision:
                states[item.user_id] = "not_provisioned"
        assert states == demo.expected[customer.id], customer.id


def test_yaml_and_yml_files_load_like_json(tmp_path: Path) -> None:
    for suffix in (".yaml", ".yml"):
        path = write(tmp_path, f"fleet{suffix}", yaml.safe_dump(minimal()))
        scenario = load_scenario(path)
        assert scenario.customers[0].sm_users[0]["email"] == "A@One.example"
        assert scenario.sm_token == "sim-sm-token"
        assert scenario.expected is None


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=r"absent\.json: file not found"):
        load_scenario(path)


def test_bad_json_says_where(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{"customers": [\n  {"id": "x",,}\n]}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2 column"):
        load_scenario(path)


def test_bad_yaml_says_where(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "customers:\n  - id: [unclosed\n    name: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+ column \d+"):
        load_scenario(path)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: d["customers"][0].pop("subdomain"), r"customers\.0\.subdomain: Field required"),
        (
            lambda d: d["customers"][0]["sm_users"][0]["sharefile"].update(state="on"),
            r"sharefile\.state 'on'",
        ),
        (lambda d: d["customers"][0]["sm_users"][0].pop("id"), r"has no string 'id'"),
        (
            lambda d: d["customers"].append(dict(d["customers"][0])),
            r"customer id 'cust-1' appears twice",
        ),
        (
            lambda d: d["customers"][0]["sharefile_employees"][0].pop("Id"),
            r"item 0 has no string 'Id'",
        ),
        (lambda d: d.update(unexpected=1), r"unexpected: Extra inputs are not permitted"),
        (lambda d: d.update(sharefile_credentials={"client_id": "x"}), r"sharefile_credentials"),
    ],
)
def test_schema_errors_are_one_line_with_the_file_and_the_place(
    tmp_path: Path, breakage: Any, message: str
) -> None:
    data = minimal()
    breakage(data)
    path = write(tmp_path, "broken.json", json.dumps(data))
    with pytest.raises(ConfigError, match=message) as caught:
        load_scenario(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"scenario file {path}: ")


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected an object with 'customers'"):
        load_scenario(write(tmp_path, "list.json", "[]"))


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported extension"):
        load_scenario(write(tmp_path, "fleet.toml", "x = 1"))


def test_scenario_round_trips_through_json() -> None:
    demo = load_scenario(DEMO_SCENARIO_PATH)
    assert Scenario.model_validate_json(demo.model_dump_json()) == demo
