"""The embedded cluster: created once, reused while it runs, reachable, stoppable."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

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


# --- where the cluster lives: the server's account must reach it ---------------------

FINGERPRINT = (
    "SELECT system_identifier, to_regclass('kept') IS NOT NULL FROM pg_control_system()"
)
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only as root does the server run as another user"
)


@pytest.fixture
def private_folder() -> Iterator[Path]:
    """A tempfile.mkdtemp() folder as it comes: 0700 and root's when we are root,
    like a clone in /root or a `mktemp -d`."""
    folder = Path(tempfile.mkdtemp(prefix="govledger-pgcluster-private-"))
    try:
        yield folder
    finally:
        pgcluster.remove(folder / ".data")
        shutil.rmtree(folder, ignore_errors=True)


def _fingerprint(dsn: str, *, create: bool = False) -> tuple[int, bool]:
    """SELECT 1 on a new connection, then the cluster's identity and whether the
    table `kept` exists (created first with `create`)."""
    return asyncio.run(_fingerprint_async(dsn, create=create))


async def _fingerprint_async(dsn: str, *, create: bool) -> tuple[int, bool]:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        if create:
            await conn.execute("CREATE TABLE kept (n int)")
        row = await conn.fetchrow(FINGERPRINT)
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


@as_root
@pytest.mark.slow
@pytest.mark.timeout(30)
def test_a_cluster_asked_for_in_a_private_folder_is_kept_where_the_server_reaches(
    private_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = private_folder.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, 0)
    requested = private_folder / ".data"

    with capture_logs() as logs:
        dsn = pgcluster.ensure_started(requested, settings=pgcluster.FAST_SETTINGS)
    actual = pgcluster.data_location(requested)

    assert not actual.is_relative_to(private_folder)
    assert actual.parent == pgcluster.RELOCATION_ROOT
    assert (actual / "PG_VERSION").is_file()
    assert not requested.exists()  # nothing left behind in the private folder
    assert (actual / "govledger.requested").read_text() == f"{requested}\n"
    moved = [entry for entry in logs if entry["event"] == "data_dir_relocated"]
    assert moved == [
        {
            "event": "data_dir_relocated",
            "log_level": "warning",
            "requested": str(requested),
            "data_dir": str(actual),
            "reason": f"user postgres cannot reach {requested}",
        }
    ]
    identifier, _ = _fingerprint(dsn, create=True)
    assert pgcluster.status(requested) == dsn

    # As `make clean-data` does: the CLI, with the path relative to the project.
    monkeypatch.chdir(private_folder)
    assert pgcluster.main(["stop", ".data"]) == 0

    assert pgcluster.status(requested) is None
    assert not (actual / "postmaster.pid").exists()
    assert not pgcluster.socket_dir(actual).exists()

    again = pgcluster.ensure_started(requested, settings=pgcluster.FAST_SETTINGS)

    assert pgcluster.data_location(requested) == actual
    assert pgcluster.data_location(Path(".data")) == actual
    assert again == dsn
    # The same cluster, data and all: no second initdb.
    assert _fingerprint(again) == (identifier, True)
    pgcluster.remove(requested)
    assert not actual.exists()


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_a_cluster_asked_for_in_a_reachable_folder_stays_where_asked(
    data_dir: Path,
) -> None:
    chain = [data_dir.parent, *data_dir.parent.parents]
    assert all(folder.stat().st_mode & 0o005 == 0o005 for folder in chain)

    with capture_logs() as logs:
        dsn = pgcluster.ensure_started(data_dir, settings=pgcluster.FAST_SETTINGS)

    assert pgcluster.data_location(data_dir) == data_dir.resolve()
    assert (data_dir / "PG_VERSION").is_file()
    assert "data_dir_relocated" not in [entry["event"] for entry in logs]
    identifier, _ = _fingerprint(dsn, create=True)
    pgcluster.stop(data_dir)
    assert pgcluster.status(data_dir) is None

    again = pgcluster.ensure_started(data_dir, settings=pgcluster.FAST_SETTINGS)

    assert pgcluster.data_location(data_dir) == data_dir.resolve()
    assert _fingerprint(again) == (identifier, True)


# --- failures: one sentence that says what to do, never an install ------------------


def test_no_binaries_is_one_sentence_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(pgcluster.ClusterError) as raised:
        pgcluster.find_binaries([])
    with pytest.raises(pgcluster.ClusterError) as partial:
        # A directory with some of the binaries but not all is no answer either.
        pgcluster.find_binaries([tmp_path, pgcluster.find_binaries().parent])

    message = str(raised.value)
    assert message == (
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them, e.g."
        " `apt-get install postgresql`, or set DATABASE_URL."
    )
    assert str(partial.value) == message


def test_bindir_and_install_print_the_binaries_found(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bindir = pgcluster.find_binaries()
    assert all((bindir / name).is_file() for name in ("initdb", "pg_ctl"))

    assert pgcluster.main(["bindir"]) == 0
    assert pgcluster.main(["install"]) == 0  # present: nothing to install

    assert capsys.readouterr().out == f"{bindir}\n{bindir}\n"


@pytest.mark.timeout(20)
def test_a_failed_initdb_is_one_sentence_without_a_traceback(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not a cluster\n")

    with pytest.raises(pgcluster.ClusterError) as raised:
        pgcluster.ensure_started(data_dir)
    code = pgcluster.main(["start", str(data_dir)])

    message = str(raised.value)
    assert message.startswith(f"initdb failed in {data_dir.resolve()} as user ")
    assert "exists but is not empty" in message
    assert message.endswith(
        "fix that, or point GOVLEDGER_DATA_DIR elsewhere, or set DATABASE_URL to use"
        " an existing PostgreSQL server."
    )
    assert "\n" not in message
    assert "not empty" in raised.value.detail
    assert code == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert (data_dir / "notes.txt").is_file()  # and nothing of it was touched
