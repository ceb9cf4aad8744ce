"""Apply migrations/*.sql in order, each in a transaction; record them in a table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger()

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Two-int advisory lock key: (a fixed namespace, 1). Concurrent migrators queue on it.
_LOCK_NAMESPACE = 0x676C6564  # "gled"
_LOCK_KEY = 1


def discover(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    """The migration files, ordered by their numeric prefix."""
    files = sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    numbers = [f.name[:4] for f in files]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"two migrations share a number in {directory}")
    return files


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Bring the database up to date; returns the names applied by this call."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate_connection(conn, directory)
    finally:
        await conn.close()


async def migrate_connection(
    conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR
) -> list[str]:
    applied: list[str] = []
    # A session lock held across the per-file transactions: a second migrator waits,
    # then finds everything applied and does nothing.
    await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_NAMESPACE, _LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name       text        PRIMARY KEY,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["name"]: r["checksum"]
            for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")
        }
        for path in discover(directory):
            sql = path.read_text(encoding="utf-8")
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != checksum:
                    log.warning("migration_changed_after_apply", migration=path.name)
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                    path.name,
                    checksum,
                )
            applied.append(path.name)
            log.info("migration_applied", migration=path.name)
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, $2)", _LOCK_NAMESPACE, _LOCK_KEY
        )
    return applied
