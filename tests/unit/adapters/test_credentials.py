"""ShareFile credentials: lookup by subdomain, loading from files, and never showing a secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.credentials import CredentialStore, ShareFileCredentials
from domain.errors import ConfigError, PermanentError

SECRET = "cl1ent-s3cret-value"
PASSWORD = "pa55-w0rd-value"
DEFAULT_SECRET = "default-s3cret-value"
DEFAULT_PASSWORD = "default-pa55-value"
ALL_SECRETS = (SECRET, PASSWORD, DEFAULT_SECRET, DEFAULT_PASSWORD)


def entries() -> dict[str, dict[str, str]]:
    return {
        "acme": {
            "client_id": "acme-client",
            "client_secret": SECRET,
            "username": "svc@acme.example",
            "password": PASSWORD,
        },
        "*": {
            "client_id": "default-client",
            "client_secret": DEFAULT_SECRET,
            "username": "svc@provider.example",
            "password": DEFAULT_PASSWORD,
        },
    }


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text


def test_a_subdomain_gets_its_own_entry() -> None:
    store = CredentialStore.from_mapping(entries())
    credentials = store.for_subdomain("acme")
    assert credentials.client_id == "acme-client"
    assert credentials.password.get_secret_value() == PASSWORD


def test_lookup_ignores_case() -> None:
    assert CredentialStore.from_mapping(entries()).for_subdomain("ACME").client_id == "acme-client"


def test_an_unknown_subdomain_falls_back_to_the_default() -> None:
    store = CredentialStore.from_mapping(entries())
    assert store.for_subdomain("globex").client_id == "default-client"


def test_an_unknown_subdomain_without_default_is_a_permanent_error() -> None:
    data = entries()
    del data["*"]
    with pytest.raises(PermanentError) as raised:
        CredentialStore.from_mapping(data).for_subdomain("globex")
    assert "globex" in str(raised.value)


def test_reprs_and_dumps_never_show_secrets() -> None:
    store = CredentialStore.from_mapping(entries())
    credentials = store.for_subdomain("acme")
    for text in (
        repr(store),
        str(store),
        repr(credentials),
        str(credentials),
        credentials.model_dump_json(),
        str(credentials.model_dump()),
    ):
        assert_no_secret(text)
    assert "acme" in repr(store)


def test_json_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(entries()))
    assert CredentialStore.from_file(path).for_subdomain("acme").username == "svc@acme.example"


def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(
        f"""
acme:
  client_id: acme-client
  client_secret: {SECRET}
  username: svc@acme.example
  password: {PASSWORD}
"*":
  client_id: default-client
  client_secret: {DEFAULT_SECRET}
  username: svc@provider.example
  password: {DEFAULT_PASSWORD}
"""
    )
    store = CredentialStore.from_file(str(path))
    assert store.for_subdomain("other").client_id == "default-client"


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_file(path)
    assert str(path) in str(raised.value)
    assert "not found" in str(raised.value)


def test_bad_json_is_one_line_with_position_and_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(entries(), indent=2).replace(f'"{PASSWORD}"', f"{PASSWORD}"))
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_file(path)
    message = str(raised.value)
    assert str(path) in message
    assert "line" in message
    assert "\n" not in message
    assert_no_secret(message)


def test_bad_yaml_is_one_line_with_position_and_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yml"
    # PyYAML's own message would quote this line, password and all.
    path.write_text(f"acme:\n  client_id: x\n  password: {PASSWORD}: oops\n")
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_file(path)
    message = str(raised.value)
    assert str(path) in message
    assert "line 3" in message
    assert "\n" not in message
    assert_no_secret(message)
    assert raised.value.__cause__ is None


def test_a_missing_field_names_the_entry_and_field(tmp_path: Path) -> None:
    data = entries()
    del data["acme"]["password"]
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_file(path)
    message = str(raised.value)
    assert "'acme'" in message
    assert "password" in message
    assert_no_secret(message)


def test_a_wrongly_typed_secret_is_not_echoed() -> None:
    data: dict[str, object] = dict(entries())
    data["acme"] = {**entries()["acme"], "password": [PASSWORD], "extra": SECRET}
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_mapping(data)
    assert_no_secret(str(raised.value))


def test_a_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text("- acme\n- globex\n")
    with pytest.raises(ConfigError) as raised:
        CredentialStore.from_file(path)
    assert "mapping" in str(raised.value)


def test_an_empty_mapping_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        CredentialStore.from_mapping({})


def test_entries_may_already_be_credentials() -> None:
    credentials = ShareFileCredentials(
        client_id="c", client_secret=SECRET, username="u", password=PASSWORD
    )
    assert CredentialStore.from_mapping({"*": credentials}).for_subdomain("x") is credentials
