"""All configuration, from SFSYNC_* environment variables (and .env), validated at start-up."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from domain.errors import ConfigError
from domain.policy import DisabledEmployees, Policy, SafetyGuard

DEFAULT_TOKEN_URL = "https://{subdomain}.sharefile.com/oauth/token"  # noqa: S105 - a URL
ENV_FILE = ".env"  # read from the working directory, under the environment's variables


class Settings(BaseSettings):
    """Every setting of every role. Secrets are SecretStr: they never print."""

    model_config = SettingsConfigDict(
        env_prefix="SFSYNC_",
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # Broker: memory:// (embedded, one process) or one or more comma-separated amqp(s):// URLs.
    # AMQP URLs carry passwords: kept out of repr(); logs redact them (see secret_values).
    broker_url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["memory://"], repr=False
    )
    prefix: str = Field(default="sfsync", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    heartbeat_s: int = Field(default=30, ge=1, le=600)
    # The broker's max_message_size: 128 MiB is RabbitMQ 3.x's default, 16 MiB RabbitMQ 4's.
    max_message_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    # TLS for amqps:// URLs: the CA that signed the brokers' certificates (default: the system's
    # CAs) and, for brokers that ask for one, this process's certificate and key (PEM files).
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    broker_key_password: SecretStr | None = None

    # Services Manager
    sm_url: str | None = None
    sm_token: SecretStr | None = None
    sm_page_size: int = Field(default=500, ge=1, le=1000)

    # ShareFile
    sharefile_token_url_template: str = DEFAULT_TOKEN_URL
    sharefile_api_url_template: str | None = None
    sharefile_credentials_file: Path | None = None
    sharefile_max_concurrency: int = Field(default=4, ge=1, le=64)

    # HTTP (both APIs)
    http_timeout_s: float = Field(default=30.0, gt=0)
    http_connect_timeout_s: float = Field(default=5.0, gt=0)
    http_attempts: int = Field(default=5, ge=1, le=20)
    http_total_s: float = Field(default=60.0, gt=0)

    # Reconcile policy and the safety guard
    disabled_employees: DisabledEmployees = DisabledEmployees.KEEP
    max_deprovision: int = Field(default=25, ge=0)
    max_deprovision_ratio: float = Field(default=0.2, ge=0.0, le=1.0)
    deprovision_ratio_floor: int = Field(default=20, ge=0)

    # Workers and delivery
    concurrency: int = Field(default=4, ge=1, le=256)
    # How long a thread of a worker or submitter process may hold the GIL while another waits
    # (sys.setswitchinterval; Python's own default is 5 ms). See sfsync.cli.roles.
    switch_interval_ms: float = Field(default=20.0, gt=0, le=1000)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_delay_s: float = Field(default=30.0, gt=0)
    delivery_limit: int = Field(default=20, ge=1)

    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error)$")

    # Operations: the audit trail, who approves held plans, metrics, the management API
    # URLs may carry passwords: SecretStr keeps them out of logs and reprs.
    database_url: SecretStr = SecretStr("sqlite:///sfsync-audit.db")
    approver: str | None = None  # recorded with approvals; defaults to the OS user
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    management_url: SecretStr | None = None  # e.g. http://guest:guest@127.0.0.1:15672

    @field_validator("broker_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        # The nodes of a cluster: separated by commas and/or white space (a URL has neither; a
        # password that does must be percent-encoded: %2C, %20).
        if isinstance(value, str):
            return [part for part in re.split(r"[,\s]+", value) if part]
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("give memory:// or at least one amqp:// URL")
        if "memory://" in urls and len(urls) > 1:
            raise ValueError("memory:// cannot be combined with other broker URLs")
        for url in urls:
            if url == "memory://":
                continue
            if not url.startswith(("amqp://", "amqps://")):
                raise ValueError("each URL must start with amqp:// or amqps:// (or be memory://)")
            if problem := _url_problem(url, host_required=False):  # no host: localhost
                raise ValueError(problem)
            import pika  # only for AMQP URLs: the embedded broker's commands do without it

            try:
                pika.URLParameters(url)
            except (ValueError, TypeError, KeyError):  # its message may quote the URL
                raise ValueError(
                    "not a valid AMQP URL: pika cannot read it (check its ?options, such as "
                    "heartbeat=30)"
                ) from None
        return urls

    @field_validator("management_url")
    @classmethod
    def _check_management_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None:
            text = url.get_secret_value()
            if not text.startswith(("http://", "https://")):
                raise ValueError("must be an http:// or https:// URL")
            if problem := _url_problem(text, host_required=True):
                raise ValueError(problem)
        return url

    @field_validator("broker_ca_file", "broker_cert_file", "broker_key_file")
    @classmethod
    def _check_readable(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path} (permissions)")
        return path

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        if self.broker_key_file is not None and self.broker_cert_file is None:
            raise ValueError(
                "SFSYNC_BROKER_KEY_FILE is set without SFSYNC_BROKER_CERT_FILE "
                "(the client certificate it belongs to)"
            )
        tls_files = (self.broker_ca_file, self.broker_cert_file, self.broker_key_file)
        if any(tls_files) and not any(u.startswith("amqps://") for u in self.broker_url):
            raise ValueError(
                "TLS files are set (SFSYNC_BROKER_CA_FILE/CERT_FILE/KEY_FILE) "
                "but no SFSYNC_BROKER_URL is amqps://"
            )
        return self

    @field_validator("sm_url")
    @classmethod
    def _check_sm_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url.rstrip("/") if url else url

    @field_validator("sharefile_token_url_template", "sharefile_api_url_template")
    @classmethod
    def _check_template(cls, template: str | None) -> str | None:
        if template is not None and "{subdomain}" not in template:
            raise ValueError("must contain {subdomain}")
        return template

    @property
    def uses_memory_broker(self) -> bool:
        return self.broker_url == ["memory://"]

    def policy(self) -> Policy:
        return Policy(
            disabled_employees=self.disabled_employees,
            guard=SafetyGuard(
                max_deprovision=self.max_deprovision,
                max_deprovision_ratio=self.max_deprovision_ratio,
                ratio_floor=self.deprovision_ratio_floor,
            ),
        )

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, whole and as URL passwords, for log redaction."""
        values: list[str] = []
        for secret in (
            self.sm_token,
            self.database_url,
            self.management_url,
            self.broker_key_password,
        ):
            if secret is not None:
                values.append(secret.get_secret_value())
        urls = [v for v in values if "://" in v] + [u for u in self.broker_url if "://" in u]
        for url in urls:
            password = urlsplit(url).password
            if password:
                values.append(unquote(password))
        return values

    def require(self, *names: str) -> None:
        """Fail with one line per missing setting that this role needs."""
        missing = [name for name in names if getattr(self, name) in (None, "")]
        if missing:
            raise ConfigError(
                "\n".join(f"SFSYNC_{name.upper()}: required for this command" for name in missing)
            )


def _url_problem(url: str, *, host_required: bool) -> str | None:
    """What is wrong with a URL's shape, in words that quote none of it (it may hold a password:
    an unencoded "/" in one moves the rest into the path, where a parser would quote it)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError:
        return (
            "not a valid URL: its port is not a number from 0 to 65535, or a /, #, ? or @ in "
            "its user name or password is not percent-encoded (%2F, %23, %3F, %40)"
        )
    if host_required and not parts.hostname:
        return "not a valid URL: no host"
    # An "@" after the host with none before it: the user name and password were cut short by
    # an unencoded "/", "#" or "?" (a vhost may hold an "@" where the URL has credentials).
    after_host = url[url.index(parts.netloc) + len(parts.netloc) :]
    if "@" in after_host and "@" not in parts.netloc:
        return (
            "not a valid URL: an @ after the host, so a /, #, ? or @ in its user name or "
            "password is not percent-encoded (%2F, %23, %3F, %40)"
        )
    return None


# Variables of the same prefix that are not settings: scripts/rabbitmq-cluster's own.
_NOT_SETTINGS = ("SFSYNC_CLUSTER_",)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """SFSYNC_* variables (of the environment and the .env file, unless `environ` is given) that
    name no setting, each with the closest setting's variable (or None): a misspelt variable
    would otherwise leave its setting, a guard threshold say, at the default without a word."""
    known = [f"SFSYNC_{name.upper()}" for name in Settings.model_fields]
    found = []
    names = {*os.environ, *dotenv_variables()} if environ is None else set(environ)
    for name in sorted(names):
        upper = name.upper()  # the settings read variables whatever their case
        if (
            upper.startswith("SFSYNC_")
            and upper not in known
            and not upper.startswith(_NOT_SETTINGS)
        ):
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            found.append((name, close[0] if close else None))
    return found


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and .env) plus explicit overrides; ConfigError lists every problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except (UnicodeError, OSError) as exc:
        # Only the .env file is read from disk here (the other files are read where used).
        problem = type(exc).__name__
        raise ConfigError(f"{ENV_FILE} cannot be read as UTF-8 text ({problem})") from None


def dotenv_variables(path: str | Path = ENV_FILE) -> dict[str, str | None]:
    """The variables a .env file sets (none if it is missing or unreadable: load_settings says
    why), for unknown_variables."""
    try:
        return dict(dotenv_values(path, encoding="utf-8"))
    except (UnicodeError, OSError):
        return {}


# Never echo what was given for these: a token, or a URL that may hold a password.
_UNSHOWN = ("token", "secret", "password", "url")


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        if not error["loc"]:
            # A check across settings: its message names the variables. Its input is every
            # setting, secrets included: never shown.
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        shown = (
            ""
            if any(word in field for word in _UNSHOWN)
            else (f" (got {error.get('input')!r})" if "input" in error else "")
        )
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"SFSYNC_{field.upper()}: {message}{shown}")
    return "\n".join(lines)
