"""docker-compose.yml stays valid (compose-spec schema) and in step with the CLI and the settings.

There is no Docker engine on this project's machines, so the file is checked, not run.
tests/data/compose_spec.json is the Compose Specification schema as shipped in docker-compose 1.29.2
(compose/config/compose_spec.json, Apache-2.0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sfsync.cli import main
from sfsync.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
ROLES = {"scheduler", "worker", "submitter", "audit"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def test_the_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(compose)
    ]
    assert errors == []


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker-1"]["ports"] = "8080"  # a string where a list is required
    assert list(validator().iter_errors(broken))


def test_rabbitmq_with_management_both_simulators_scheduler_two_workers_and_a_submitter(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["rabbitmq"]["image"].endswith("-management")
    roles = sorted(s["command"][0] for s in services.values() if "command" in s)
    assert roles == ["audit", "scheduler", "simulate", "submitter", "worker", "worker"]


def test_the_audit_role_keeps_its_database_in_a_volume_and_starts_before_the_scheduler(
    compose: dict[str, Any],
) -> None:
    audit = compose["services"]["audit"]
    assert audit["environment"]["SFSYNC_DATABASE_URL"] == "sqlite:////data/sfsync-audit.db"
    assert "audit:/data" in audit["volumes"] and "audit" in compose["volumes"]
    depends = compose["services"]["scheduler"]["depends_on"]
    assert depends["audit"] == {"condition": "service_healthy"}
    # Healthy once it serves metrics, which it does only after its queue is declared.
    port = audit["environment"]["SFSYNC_METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in " ".join(audit["healthcheck"]["test"])
    assert "mkdir /data && chown sfsync /data" in (ROOT / "Dockerfile").read_text()


def test_the_image_copies_every_file_the_package_build_names() -> None:
    # pyproject's license-files: setuptools warns when it is missing, and will refuse to build.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    copied = " ".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
    ).split()
    for name in [*project.get("license-files", []), project["readme"], "pyproject.toml"]:
        assert name in copied, f"the Dockerfile does not copy {name}"


def test_every_service_it_depends_on_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_every_command_and_option_exists_in_the_cli(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "command" not in service:
            continue
        subcommand, *args = service["command"]
        assert subcommand in main.commands, f"{name}: sfsync has no `{subcommand}` command"
        known = {opt for p in main.commands[subcommand].params for opt in p.opts}
        for arg in args:
            if arg.startswith("--"):
                assert arg in known, f"{name}: `sfsync {subcommand}` has no option {arg}"


def test_every_environment_variable_is_a_valid_setting(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    for name, service in compose["services"].items():
        if service.get("command", [""])[0] not in ROLES:
            continue
        env = service["environment"]
        fields = {f"SFSYNC_{field.upper()}" for field in Settings.model_fields}
        assert set(env) <= fields, f"{name}: unknown settings {set(env) - fields}"
        values = {k.removeprefix("SFSYNC_").lower(): v for k, v in env.items()}
        values["sharefile_credentials_file"] = str(tmp_path / "credentials.json")
        settings = load_settings(**values)
        assert not settings.uses_memory_broker


def test_the_mounted_credentials_file_is_in_the_repository(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source in compose.get("volumes", {}):
                continue  # a named volume, not a file of the repository
            assert (ROOT / source).is_file(), source
