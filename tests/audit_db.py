"""Audit-database fixtures: a fresh SQLite file, or a fresh schema in the local PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

LOCAL_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Every schema a test creates starts with this session's prefix; the session drops them all.
PG_SESSION_PREFIX = f"sfsync_t{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """PG_URL if set, else the local PostgreSQL. Under CI=true a PostgreSQL that does not answer
    fails the test: database tests never skip silently there."""
    url = os.environ.get("PG_URL", LOCAL_PG_URL)
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3}, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        message = f"no PostgreSQL answers ({exc.orig}); set PG_URL or start PostgreSQL"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield url
    finally:
        _drop_session_schemas(engine)
        engine.dispose()


def _drop_session_schemas(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        names = connection.execute(
            sa.text("select nspname from pg_namespace where nspname like :prefix"),
            {"prefix": f"{PG_SESSION_PREFIX}%"},
        ).scalars()
        for name in list(names):
            connection.execute(sa.text(f'drop schema "{name}" cascade'))


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema of their own (dropped afterwards)."""
    schema = f"{PG_SESSION_PREFIX}_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text(f'create schema "{schema}"'))
    url = sa.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
        engine.dispose()


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'audit.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("postgres_schema_url"))
