"""Shared fixtures: a real PostgreSQL with the production migrations applied
(`database`), one pool for the session (`pool`), the service on a test server
(`api`, see tests/api.py), a TRUNCATE after every test that touched the database
(`clean`), and a second migrated database on the same server (`copy_database`,
`copy_pool`) for exports, imports and replays to land in."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog

from service import eventstore, pgcluster

if TYPE_CHECKING:
    from tests.api import Api

# A test that asks for any of these gets the tables emptied after it.
DATABASE_FIXTURES = frozenset({"database", "pool", "client", "api"})

# The service's own secret (it seals the answers kept for Idempotency-Keys) for every
# app built in process and every served process of the session: made up here, so no
# key file is written beside a data directory.
os.environ.setdefault("GOVLEDGER_SECRET_KEY", secrets.token_hex(32))


# --- no secret in any log line the service wrote during the session ----------------
# What the scan looks for: a virtual key's secret, a bearer credential, a password in
# a DSN or a key/value string, and the session's own secret key. Lines of apps built
# in process pass a structlog processor; a served process's JSON lines are read before
# its log file is removed. What service.log masked ("[redacted]") is no leak.
_MASKED = r"(?!\[redacted\]|<token>)"
_SECRET_SHAPES = re.compile(
    r"sk-gl-[A-Za-z0-9_-]{32}"
    rf"|(?i:\bbearer\s+{_MASKED}[^\s\"',;<]+)"
    rf"|\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]+:{_MASKED}[^\s@/]+@"
    rf"|(?i:\bpassword\s*=\s*{_MASKED}[^\s&;,'\"]+)"
    r"|" + re.escape(os.environ["GOVLEDGER_SECRET_KEY"])
)
_leaks: list[str] = []


def _scan(where: str, text: str) -> None:
    for line in text.splitlines():
        if _SECRET_SHAPES.search(line) and len(_leaks) < 20:
            _leaks.append(f"{where}: {line[:300]}")


def _scanning(logger: object, method: str, event: Any) -> Any:
    """A structlog processor: every event of the session, as written, scanned."""
    _scan("in process", repr(event))
    return event


@pytest.fixture(scope="session", autouse=True)
def log_scan(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the session if any line the service wrote carried a secret."""
    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[*processors[:-1], _scanning, processors[-1]])
    items = request.session.items
    if all(item.nodeid.startswith("tests/domain/") for item in items):
        yield  # no service runs: tests/domain must not need aiohttp either
    else:
        from tests.served import Served

        remove_log = Served.remove_log

        def scanned(self: Served) -> None:
            with contextlib.suppress(FileNotFoundError):
                _scan(f"served {self.name}", self.log_text())
            remove_log(self)

        Served.remove_log = scanned  # type: ignore[method-assign]
        try:
            yield
        finally:
            Served.remove_log = remove_log  # type: ignore[method-assign]
    assert _leaks == [], "secrets in log lines:\n" + "\n".join(_leaks)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes seconds rather than milliseconds")
    config.addinivalue_line("markers", "browser: drives Debian's chromium")
    config.addinivalue_line("markers", "soak: long load run; only with `-m soak`")


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if "soak" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="soak tests run only with -m soak (make soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def database() -> AsyncIterator[str]:
    """DSN of a fresh, migrated database: on DATABASE_URL's server when it is set,
    else in a throwaway cluster started for the session."""
    server = os.environ.get("DATABASE_URL")
    if server:
        async with _migrated_database(server, "govledger_test") as dsn:
            yield dsn
    else:
        from service.migrate import migrate  # deferred: tests/domain must not need it

        with pgcluster.throwaway(settings={"max_connections": "200"}) as dsn:
            await migrate(dsn)
            yield dsn


@pytest.fixture(scope="session")
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await eventstore.create_pool(database, min_size=2, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def api(database: str) -> AsyncIterator[Api]:
    """The service with default settings (open, on loopback) on a test server."""
    from tests.api import serve  # deferred: tests/domain must not need aiohttp

    async with serve(database) as api:
        yield api


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> None:
    """Empty every table but schema_migrations after a test that used the database.

    A sync gate, so tests without the database pay nothing; the async work is in
    `truncate_after`, requested only when needed (and torn down after `client`).
    """
    if DATABASE_FIXTURES.intersection(request.fixturenames):
        request.getfixturevalue("truncate_after")


@pytest.fixture
async def truncate_after(pool: asyncpg.Pool) -> AsyncIterator[None]:
    yield
    await _truncate(pool)


@pytest.fixture(scope="module")
async def copy_database(database: str) -> AsyncIterator[str]:
    """A second migrated database on the same server: the target of imports."""
    async with _migrated_database(database, "govledger_copy") as dsn:
        yield dsn


@pytest.fixture
async def copy_pool(copy_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on `copy_database`, whose tables are emptied after the test."""
    pool = await eventstore.create_pool(copy_database, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await _truncate(pool)
        await pool.close()


async def _truncate(pool: asyncpg.Pool) -> None:
    """Empty every table but schema_migrations."""
    # Listed afresh each time so tables added by later migrations are covered.
    tables = await pool.fetch(
        "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
    )
    if tables:
        names = ", ".join(row["name"] for row in tables)
        # The log refuses TRUNCATE (migrations/0005) unless the session switches
        # triggers off, which only a superuser (as the tests connect) may do.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


@contextlib.asynccontextmanager
async def _migrated_database(server: str, prefix: str) -> AsyncIterator[str]:
    """A fresh database on `server`'s cluster with the migrations applied, dropped
    afterwards."""
    from service.migrate import migrate  # deferred: tests/domain must not need it

    name = f"{prefix}_{secrets.token_hex(6)}"
    await _execute(server, f'CREATE DATABASE "{name}"')
    try:
        dsn = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
        await migrate(dsn)
        yield dsn
    finally:
        await _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
