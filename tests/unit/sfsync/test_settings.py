"""Settings fail at start-up with one clear line per problem, and never print a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.errors import ConfigError
from domain.policy import DisabledEmployees
from sfsync.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_embedded_broker_and_the_documented_guard() -> None:
    settings = load_settings()
    assert settings.uses_memory_broker
    guard = settings.policy().guard
    assert (guard.max_deprovision, guard.max_deprovision_ratio, guard.ratio_floor) == (25, 0.2, 20)
    assert settings.policy().disabled_employees is DisabledEmployees.KEEP


def test_environment_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqp://a:1/, amqp://b:2/")
    monkeypatch.setenv("SFSYNC_MAX_DEPROVISION", "3")
    monkeypatch.setenv("SFSYNC_DISABLED_EMPLOYEES", "deprovision")
    settings = load_settings()
    assert settings.broker_url == ["amqp://a:1/", "amqp://b:2/"]
    assert settings.policy().guard.max_deprovision == 3
    assert settings.policy().disabled_employees is DisabledEmployees.DEPROVISION


def test_a_dotenv_file_is_read(tmp_path) -> None:
    (tmp_path / ".env").write_text("SFSYNC_CONCURRENCY=7\n")
    assert load_settings().concurrency == 7


def test_every_problem_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFSYNC_MAX_DEPROVISION", "many")
    monkeypatch.setenv("SFSYNC_BROKER_URL", "redis://localhost")
    monkeypatch.setenv("SFSYNC_MAX_DEPROVISION_RATIO", "2")
    with pytest.raises(ConfigError) as error:
        load_settings()
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("SFSYNC_MAX_DEPROVISION:") and "'many'" in line for line in lines)
    assert any(line.startswith("SFSYNC_BROKER_URL:") for line in lines)
    assert any(line.startswith("SFSYNC_MAX_DEPROVISION_RATIO:") for line in lines)


def test_a_bad_secret_is_reported_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFSYNC_SM_TOKEN", "")
    monkeypatch.setenv(
        "SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE", "https://no-placeholder.example/token"
    )
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE: must contain {subdomain}" in str(error.value)


def test_the_token_never_appears_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFSYNC_SM_TOKEN", "s3cr3t-token-value")
    settings = load_settings()
    assert "s3cr3t-token-value" not in repr(settings)
    assert "s3cr3t-token-value" not in str(settings.model_dump())


def test_secret_values_include_url_passwords_for_log_redaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SFSYNC_SM_TOKEN", "sm-token-1234")
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqp://svc:br%40ker-pw@rabbit:5672/")
    monkeypatch.setenv("SFSYNC_DATABASE_URL", "postgresql+psycopg://audit:db-pw-5678@db/sfsync")
    secrets = load_settings().secret_values()
    assert {"sm-token-1234", "br@ker-pw", "db-pw-5678"} <= set(secrets)
    assert "postgresql+psycopg://audit:db-pw-5678@db/sfsync" in secrets


def test_required_settings_are_named_when_missing() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings().require("sm_url", "sm_token")
    assert str(error.value).splitlines() == [
        "SFSYNC_SM_URL: required for this command",
        "SFSYNC_SM_TOKEN: required for this command",
    ]


def test_broker_urls_may_be_separated_by_commas_spaces_or_newlines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqp://a:1/,amqps://b:2/  amqp://c:3/\namqp://d:4/")
    assert load_settings().broker_url == [
        "amqp://a:1/",
        "amqps://b:2/",
        "amqp://c:3/",
        "amqp://d:4/",
    ]


def test_tls_files_are_checked_at_start_up_with_one_line_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqps://svc:pw@rabbit:5671/")
    monkeypatch.setenv("SFSYNC_BROKER_CA_FILE", str(tmp_path / "missing-ca.pem"))
    monkeypatch.setenv("SFSYNC_BROKER_CERT_FILE", str(tmp_path))  # a folder, not a file
    with pytest.raises(ConfigError) as error:
        load_settings()
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"SFSYNC_BROKER_CA_FILE: no such file: {tmp_path}")
    assert lines[1].startswith(f"SFSYNC_BROKER_CERT_FILE: no such file: {tmp_path}")
    assert len(lines) == 2


def test_a_key_without_its_certificate_is_refused_without_echoing_any_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    key = tmp_path / "client.key"
    key.write_text("key")
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqps://svc:br0ker-pw@rabbit:5671/")
    monkeypatch.setenv("SFSYNC_SM_TOKEN", "sm-token-1234")
    monkeypatch.setenv("SFSYNC_BROKER_KEY_FILE", str(key))
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == (
        "SFSYNC_BROKER_KEY_FILE is set without SFSYNC_BROKER_CERT_FILE "
        "(the client certificate it belongs to)"
    )


def test_tls_files_without_an_amqps_url_are_a_mistake(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqp://svc:pw@rabbit:5672/")
    monkeypatch.setenv("SFSYNC_BROKER_CA_FILE", str(ca))
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "no SFSYNC_BROKER_URL is amqps://" in str(error.value)


def test_the_key_password_is_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text(name)
    monkeypatch.setenv("SFSYNC_BROKER_URL", "amqps://svc:pw@rabbit:5671/")
    monkeypatch.setenv("SFSYNC_BROKER_CA_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SFSYNC_BROKER_CERT_FILE", str(tmp_path / "client.pem"))
    monkeypatch.setenv("SFSYNC_BROKER_KEY_FILE", str(tmp_path / "client.key"))
    monkeypatch.setenv("SFSYNC_BROKER_KEY_PASSWORD", "k3y-pa55")
    settings = load_settings()
    assert "k3y-pa55" not in repr(settings)
    assert "k3y-pa55" in settings.secret_values()


@pytest.mark.parametrize(
    ("variable", "url", "problem"),
    [
        # An unencoded "/" in the password: a parser takes "Kq9Zt" for the port and quotes it.
        ("SFSYNC_BROKER_URL", "amqp://sfsync:Kq9Zt/w3Rb+Lm@rabbit-1:5672/", "percent-encoded"),
        ("SFSYNC_BROKER_URL", "amqp://sfsync:123/Kq9Zt@rabbit-1:5672/", "an @ after the host"),
        ("SFSYNC_BROKER_URL", "amqp://sfsync:Kq9Zt@rabbit-1:99999/", "not a number from 0"),
        ("SFSYNC_BROKER_URL", "amqp://sfsync:Kq9Zt@rabbit-1/?heartbeat=x", "pika cannot read"),
        ("SFSYNC_MANAGEMENT_URL", "http://:15672/", "no host"),
        ("SFSYNC_MANAGEMENT_URL", "http://guest:Kq9Zt/w3@127.0.0.1:15672", "percent-encoded"),
        ("SFSYNC_MANAGEMENT_URL", "ftp://guest:Kq9Zt@127.0.0.1", "http:// or https://"),
    ],
)
def test_a_malformed_url_is_one_clear_line_that_quotes_none_of_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str, problem: str
) -> None:
    monkeypatch.setenv(variable, url)
    with pytest.raises(ConfigError) as error:
        load_settings()
    [line] = str(error.value).splitlines()
    assert line.startswith(f"{variable}: ") and problem in line
    assert "Kq9Zt" not in line and "rabbit-1" not in line


@pytest.mark.parametrize(
    "url",
    [
        "amqp://sfsync:Kq9Zt%2Fw3Rb+Lm@rabbit-1:5672/",  # a percent-encoded password
        "amqp://guest:guest@127.0.0.1:5672/team@prod",  # an "@" in the vhost, after credentials
        "amqp://",  # localhost, as pika and RabbitMQ's URI spec read it
        "amqp:///%2F",
        "amqp://guest:guest@[::1]:5672/",
        "amqps://sfsync:pw@rabbit-1.example:5671/prod?heartbeat=30",
    ],
)
def test_valid_amqp_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("SFSYNC_BROKER_URL", url)
    assert load_settings().broker_url == [url]


def test_misspelt_variables_are_found_with_the_setting_they_probably_meant() -> None:
    from sfsync.settings import unknown_variables

    environ = {
        "SFSYNC_MAX_DEPROVISON": "5",  # the guard would stay at 25 without a word
        "SFSYNC_NOTHING_LIKE_IT": "1",
        "SFSYNC_MAX_DEPROVISION": "5",
        "SFSYNC_CLUSTER_DIR": "cluster",  # scripts/rabbitmq-cluster's own
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        ("SFSYNC_MAX_DEPROVISON", "SFSYNC_MAX_DEPROVISION"),
        ("SFSYNC_NOTHING_LIKE_IT", None),
    ]
    # The settings read variables whatever their case: this one is in effect, not unknown.
    assert unknown_variables({"sfsync_max_deprovision": "3", "Sfsync_Prefix": "x"}) == []


def test_a_misspelt_variable_in_the_dotenv_file_is_found_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sfsync.settings import unknown_variables

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SFSYNC_MAX_DEPROVISON=5\nSFSYNC_PREFIX=acme\n")
    assert ("SFSYNC_MAX_DEPROVISON", "SFSYNC_MAX_DEPROVISION") in unknown_variables()
    assert "SFSYNC_PREFIX" not in {name for name, _ in unknown_variables()}


def test_a_dotenv_file_that_is_not_utf8_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sfsync.settings import unknown_variables

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"SFSYNC_PREFIX=\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"\.env cannot be read as UTF-8 text"):
        load_settings()
    unknown_variables()  # must not raise either: load_settings has said what is wrong
