"""Migrations: forward-only, recorded, a no-op when up to date, safe when concurrent."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.migrate import discover, migrate


@pytest.fixture
async def empty_database(database: str) -> AsyncIterator[str]:
    """A second, empty database on the test server."""
    name = f"govledger_migrate_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(database)._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migrate_applies_every_file_once_and_then_does_nothing(empty_database):
    names = [p.name for p in discover()]

    assert await migrate(empty_database) == names
    assert await migrate(empty_database) == []
    conn = await asyncpg.connect(empty_database)
    try:
        recorded = [
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM schema_migrations ORDER BY name"
            )
        ]
    finally:
        await conn.close()
    assert recorded == names


async def test_concurrent_migrators_apply_each_migration_exactly_once(empty_database):
    results = await asyncio.gather(*(migrate(empty_database) for _ in range(4)))

    applied = [name for result in results for name in result]
    assert sorted(applied) == [p.name for p in discover()]
