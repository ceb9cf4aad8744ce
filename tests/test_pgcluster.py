"""The embedded cluster: created once, reused while it runs, reachable, stoppable."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service import pgcluster


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: pytest makes its base 0700, and as root the server runs as
    # another user who must reach the directory.
    parent = Path(tempfile.mkdtemp(prefix="govledger-pgcluster-test-"))
    parent.chmod(0o755)
    try:
        yield parent / "data"
    finally:
        pgcluster.stop(parent / "data")
        shutil.rmtree(parent, ignore_errors=True)


IDENTITY = (
    "SELECT system_identifier, pg_postmaster_start_time() FROM pg_control_system()"
)


@pytest.mark.slow
@pytest.mark.timeout(20)
async def test_ensure_started_creates_then_reuses_and_stop_stops(
    data_dir: Path,
) -> None:
    dsn = pgcluster.ensure_started(data_dir, settings=pgcluster.FAST_SETTINGS)
    conn = await asyncpg.connect(dsn)
    try:
        first = await conn.fetchrow(IDENTITY)

        again = pgcluster.ensure_started(data_dir)

        assert again == dsn
        # Same system identifier: no new initdb; same start time: no restart.
        assert await conn.fetchrow(IDENTITY) == first
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "govledger"
    finally:
        await conn.close()
    assert pgcluster.status(data_dir) == dsn

    pgcluster.stop(data_dir)

    assert pgcluster.status(data_dir) is None
    assert not (data_dir / "postmaster.pid").exists()
    assert not pgcluster.socket_dir(data_dir).exists()
