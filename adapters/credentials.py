"""ShareFile credentials per account subdomain, read from a JSON or YAML file without leaking."""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from types import MappingProxyType

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from domain.errors import ConfigError, PermanentError

DEFAULT_KEY = "*"
"""The entry used for every subdomain that has no entry of its own."""


class ShareFileCredentials(BaseModel):
    """What the OAuth password grant needs for one ShareFile account; secrets stay masked."""

    # hide_input_in_errors: a ValidationError must not print the password it failed to read.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    username: str = Field(min_length=1)
    password: SecretStr

    def secret_values(self) -> tuple[str, ...]:
        """The raw secrets, for scrubbing them out of server texts."""
        return (self.client_secret.get_secret_value(), self.password.get_secret_value())


class CredentialStore:
    """Credentials by ShareFile subdomain (case-insensitive), with an optional "*" default."""

    def __init__(self, entries: Mapping[str, ShareFileCredentials]) -> None:
        self._entries = MappingProxyType({key.lower(): value for key, value in entries.items()})

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, object], *, source: str = "credentials"
    ) -> CredentialStore:
        """Validate a mapping {"acme": {...}, "*": {...}}; problems are one-line ConfigErrors."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: expected a mapping of subdomain to credentials, "
                f"got {type(data).__name__}"
            )
        if not data:
            raise ConfigError(f"{source}: no credentials (the mapping is empty)")
        entries: dict[str, ShareFileCredentials] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(f"{source}: every key must be a subdomain or '*', got {key!r}")
            if isinstance(value, ShareFileCredentials):
                entries[key.strip()] = value
                continue
            try:
                entries[key.strip()] = ShareFileCredentials.model_validate(value)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                    for err in exc.errors(include_input=False, include_url=False)
                )
                raise ConfigError(f"{source}: entry {key!r}: {problems}") from None
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> CredentialStore:
        """Read a JSON (.json) or YAML (anything else) file; problems are one-line ConfigErrors.

        Parser messages are reduced to line and column: PyYAML quotes the offending line, and
        that line may hold a password.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{file}: credentials file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{file}: cannot read credentials file ({type(exc).__name__})"
            ) from None
        data: object
        if file.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
                ) from None
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(
                    f"{file}: invalid YAML{where}: {exc.problem or 'syntax error'}"
                ) from None
            except yaml.YAMLError:
                raise ConfigError(f"{file}: invalid YAML") from None
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{file}: expected a mapping of subdomain to credentials, got {type(data).__name__}"
            )
        return cls.from_mapping(data, source=str(file))

    def for_subdomain(self, subdomain: str) -> ShareFileCredentials:
        """The subdomain's own entry, else the "*" default.

        Missing credentials are a PermanentError (not a ConfigError): they concern one customer,
        whose sync should be parked while the others go on.
        """
        found = self._entries.get(subdomain.lower()) or self._entries.get(DEFAULT_KEY)
        if found is None:
            raise PermanentError(
                f"no ShareFile credentials for subdomain {subdomain!r} "
                f"and no {DEFAULT_KEY!r} default",
                call="credentials",
            )
        return found

    def subdomains(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __repr__(self) -> str:
        return f"CredentialStore(subdomains={sorted(self._entries)!r})"

    __str__ = __repr__
