"""The SQL read model's projector in its own process: `govledger serve` starts
`govledger project` as a child, restarts it when it dies and takes it along when it
stops or is killed; with `--no-projector` (or GOVLEDGER_PROJECTOR=external) it
starts none and only follows the checkpoint a `govledger project` run elsewhere
writes. Real PostgreSQL, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from structlog.testing import capture_logs

from projections import governance
from projections.runner import (
    CHECKPOINT_CHANNEL,
    Projector,
    Tail,
    announced,
    announcement,
)
from service.domain.events import CustomerCreated
from service.records import Checkpoint
from tests.builders import append, uid
from tests.served import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TEAMS,
    Fleet,
    Served,
    call,
)

T = TypeVar("T")


@pytest.fixture
def fleet(database: str) -> Any:
    with Fleet(database) as fleet:
        yield fleet


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def until(
    probe: Callable[[], T], what: str, within_s: float = START_TIMEOUT_S
) -> T:
    """The first answer of `probe` that is not None or empty, polled: it watches
    other processes (their logs, /proc), which send this one no event to wait on."""
    deadline = time.monotonic() + within_s
    while not (found := probe()):
        assert time.monotonic() < deadline, f"no {what} within {within_s} s"
        await asyncio.sleep(0.05)
    return found


def events(served: Served, name: str) -> list[dict[str, Any]]:
    return [line for line in served.log_lines() if line.get("event") == name]


def children_started(served: Served) -> list[int]:
    """Pids of the projector children `served` started, in order."""
    return [int(line["pid"]) for line in events(served, "projector_child_started")]


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0")


async def create_team(
    session: aiohttp.ClientSession, served: Served, name: str
) -> tuple[str, int]:
    status, answer = await call(session, "POST", served.url + TEAMS, {"name": name})
    assert status == 201, answer
    return answer["team"]["id"], int(answer["position"])


async def read_team(
    session: aiohttp.ClientSession, served: Served, team_id: str, position: int
) -> tuple[int, Any]:
    """GET the team with ?min_position=: 200, or 503 after the service's 2 s."""
    return await call(
        session, "GET", f"{served.url}{TEAMS}/{team_id}?min_position={position}"
    )


async def test_serve_runs_the_projector_as_a_child_and_restarts_it_after_sigkill(
    fleet, session
):
    served = fleet.start(name="parent")
    await served.ready(session)
    [first] = await until(lambda: children_started(served), "child")
    assert children_of(served.pid) == [first]
    assert command_line(first)[-3:] == ["service", "project", "--with-parent"]
    [started] = await until(
        lambda: events(served, "projector_started"), "child's start"
    )
    assert started["pid"] == first
    # Both processes run on uvloop, the default.
    [serving] = events(served, "serving")
    assert (serving["event_loop"], started["event_loop"]) == ("uvloop", "uvloop")

    # The serving process only follows: this read is answered from the read model
    # the child wrote, once the child's checkpoint passed the team's position.
    team_id, position = await create_team(session, served, "first")
    status, answer = await read_team(session, served, team_id, position)
    assert (status, answer["team"]["name"]) == (200, "first")

    os.kill(first, signal.SIGKILL)
    [exited] = await until(
        lambda: events(served, "projector_child_exited"), "exit logged"
    )
    assert (exited["pid"], exited["code"], exited["restart_in_s"]) == (
        first,
        -signal.SIGKILL,
        0.5,
    )
    [_, second] = await until(
        lambda: children_started(served)[1:] and children_started(served), "restart"
    )
    assert children_of(served.pid) == [second]
    team_id, position = await create_team(session, served, "second")
    status, answer = await read_team(session, served, team_id, position)
    assert (status, answer["team"]["name"]) == (200, "second")

    assert served.stop() == 0
    assert not is_running(second)
    [stopped] = events(served, "projector_child_stopped")
    assert (stopped["pid"], stopped["code"]) == (second, 0)
    assert [line["pid"] for line in events(served, "projector_started")] == [
        first,
        second,
    ]
    assert len(events(served, "projector_stopped")) == 1  # the SIGKILLed one did not


async def test_a_serve_killed_by_sigkill_takes_its_child_along(fleet, session):
    served = fleet.start(name="killed")
    await served.ready(session)
    [child] = await until(lambda: children_started(served), "child")
    served.kill()
    await until(lambda: not is_running(child), "child gone")
    [gone] = events(served, "projector_parent_gone")
    assert gone["parent"] != served.pid  # reparented by the time it noticed
    assert len(events(served, "projector_stopped")) == 1


class NoProjector(Served):
    """`govledger serve --no-projector`."""

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, **options)
        self._args.append("--no-projector")


@pytest.mark.parametrize("how", ["--no-projector", "GOVLEDGER_PROJECTOR=external"])
async def test_without_a_child_serve_follows_a_projector_run_elsewhere(
    database, fleet, session, how
):
    if how == "--no-projector":
        served: Served = NoProjector(database, name="follower")
        fleet.servers.append(served)
        served.start()
    else:
        served = fleet.start(name="follower", env={"GOVLEDGER_PROJECTOR": "external"})
    await served.ready(session)
    team_id, position = await create_team(session, served, "elsewhere")
    status, answer = await read_team(session, served, team_id, position)
    assert (status, answer["error"]["code"]) == (503, "projection_lag")
    assert children_of(served.pid) == []
    assert events(served, "projector_child_started") == []

    project = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "project",
        env={**os.environ, "DATABASE_URL": served.dsn},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status, answer = await read_team(session, served, team_id, position)
        while status == 503:  # the new process starts (and migrates) first
            assert project.returncode is None
            assert time.monotonic() < deadline
            status, answer = await read_team(session, served, team_id, position)
        assert (status, answer["team"]["name"]) == (200, "elsewhere")
        project.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            _, stderr = await project.communicate()
    finally:
        if project.returncode is None:
            project.kill()
            await project.communicate()
    assert project.returncode == 0, stderr
    logged = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert ("projector_started" in logged, logged[-1]) == (True, "projector_stopped")
    assert served.stop() == 0


async def test_a_follower_learns_of_a_moved_checkpoint_at_once_and_never_applies(
    pool, database
):
    """Woken by the applying projector's notification at its commit, not by its
    poll (an hour here), and holding no lock: its own steps apply nothing."""
    applying = Projector(pool, "governance", governance.apply)
    follower = Projector(
        pool, "governance", governance.apply, follow_only=True, poll_interval_s=3600
    )
    tail = Tail(database)
    tail.start(follower)
    try:
        await asyncio.wait_for(tail.listener.listening.wait(), 10)
        customer_id = uid()
        position = await append(
            pool,
            f"customer-{customer_id}",
            CustomerCreated(customer_id=customer_id, name="a"),
        )
        assert await follower.step() is False
        assert follower.checkpoint.position == 0
        tail.start(applying)
        await follower.wait_for(position, timeout=10)
        assert follower.checkpoint == applying.checkpoint
        assert (follower.ready, follower.lag_events) == (True, 0)
    finally:
        await tail.stop()
    with pytest.raises(ValueError, match="only a persistent projection"):
        Projector(pool, "cache", governance.apply, persistent=False, follow_only=True)


async def test_a_follower_takes_the_announced_checkpoint_and_reads_the_row_otherwise(
    pool, database
):
    """The applying projector's notification carries its new checkpoint, which a
    follower takes without reading the row; a notification without one (as an
    older version sends) makes it read the row."""
    applying = Projector(pool, "governance", governance.apply)
    follower = Projector(
        pool, "governance", governance.apply, follow_only=True, poll_interval_s=3600
    )
    tail = Tail(database)  # its listener only: this test steps the follower
    follower.announced = tail.moved.checkpoints

    async def notified(notify: Awaitable[object]) -> None:
        seen = tail.moved.generation
        await notify
        await tail.moved.wait(seen, 10)
        assert tail.moved.generation > seen
        assert await follower.step() is False

    try:
        await asyncio.wait_for(tail.listener.listening.wait(), 10)
        assert await follower.step() is False  # the row, read at its first step
        customer_id = uid()
        await append(
            pool,
            f"customer-{customer_id}",
            CustomerCreated(customer_id=customer_id, name="a"),
        )
        await notified(applying.step())
        assert tail.moved.checkpoints == {"governance": applying.checkpoint}
        assert follower.checkpoint == applying.checkpoint

        # Taken as announced: the row is not read for it.
        told = Checkpoint(applying.checkpoint.tx_id + 7, applying.checkpoint.position)
        await notified(
            pool.execute(
                "SELECT pg_notify($1, $2)",
                CHECKPOINT_CHANNEL,
                announcement("governance", told),
            )
        )
        assert follower.checkpoint == told

        # A bare name: the row is read, and says where the projection is.
        await notified(
            pool.execute("SELECT pg_notify($1, 'governance')", CHECKPOINT_CHANNEL)
        )
        assert follower.checkpoint == applying.checkpoint
    finally:
        await tail.stop()


async def test_a_projector_started_while_the_database_is_down_waits_for_it(database):
    """`govledger project` started during an outage (its supervisor restarts it
    then) waits for the database instead of exiting into the supervisor's back-off;
    it gives up only when told to stop."""
    from service.cli import _connected

    stop = asyncio.Event()
    unreachable = "postgresql://postgres@/govledger?host=/nonexistent-govledger-dir"
    with capture_logs() as logs:
        waiting = asyncio.create_task(_connected(unreachable, stop))
        deadline = time.monotonic() + 10
        while not any(e["event"] == "projector_waiting_for_database" for e in logs):
            assert not waiting.done(), "it gave up while the database was down"
            assert time.monotonic() < deadline, "no word of waiting"
            await asyncio.sleep(0.01)  # polls a log list, not a projection
        stop.set()
        assert await asyncio.wait_for(waiting, 10) is None

    pool = await _connected(database, asyncio.Event())
    try:
        assert pool is not None
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        if pool is not None:
            await pool.close()


def test_an_announcement_names_a_projection_and_its_checkpoint():
    told = announcement("governance", Checkpoint(812, 9_000_001))
    assert told == "governance 812 9000001"
    assert announced(told) == ("governance", Checkpoint(812, 9_000_001))
    for payload in ("governance", "governance 812", "governance x 1", "a 1 2 3", ""):
        assert announced(payload) is None


def test_a_placement_other_than_inline_child_or_external_refuses_to_start():
    from service.config import ConfigError, Settings

    assert Settings.from_env({}).projector == "child"
    assert Settings.from_env({"GOVLEDGER_PROJECTOR": "external"}).projector == (
        "external"
    )
    with pytest.raises(ConfigError, match="GOVLEDGER_PROJECTOR must be one of"):
        Settings.from_env({"GOVLEDGER_PROJECTOR": "elsewhere"})


async def test_both_processes_run_on_the_asyncio_loop_when_told_to(fleet, session):
    served = fleet.start(name="asyncio", env={"GOVLEDGER_EVENT_LOOP": "asyncio"})
    await served.ready(session)
    [started] = await until(
        lambda: events(served, "projector_started"), "child's start"
    )
    [serving] = events(served, "serving")
    assert (serving["event_loop"], started["event_loop"]) == ("asyncio", "asyncio")
    team_id, position = await create_team(session, served, "on asyncio")
    status, answer = await read_team(session, served, team_id, position)
    assert (status, answer["team"]["name"]) == (200, "on asyncio")


def test_an_event_loop_other_than_uvloop_or_asyncio_refuses_to_start():
    from service.config import ConfigError, Settings

    assert Settings.from_env({}).event_loop == "uvloop"
    assert Settings.from_env({"GOVLEDGER_EVENT_LOOP": ""}).event_loop == "uvloop"
    assert Settings.from_env({"GOVLEDGER_EVENT_LOOP": "asyncio"}).event_loop == (
        "asyncio"
    )
    with pytest.raises(
        ConfigError, match=r"^GOVLEDGER_EVENT_LOOP must be one of uvloop, asyncio$"
    ):
        Settings.from_env({"GOVLEDGER_EVENT_LOOP": "trio"})


def test_the_loop_factory_makes_the_loop_it_names(monkeypatch):
    import uvloop

    from service import event_loop

    for choice, kind in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        new_loop, name = event_loop.factory(choice)
        loop = new_loop()
        try:
            assert (name, isinstance(loop, kind)) == (choice, True)
        finally:
            loop.close()
    new_loop, name = event_loop.factory("asyncio")
    loop = new_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()

    # Where uvloop is not installed: asyncio's loop, and a warning that says so.
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    with capture_logs() as logged:
        new_loop, name = event_loop.factory("uvloop")
    assert (new_loop, name) == (asyncio.new_event_loop, "asyncio")
    assert [(e["event"], e["wanted"], e["using"]) for e in logged] == [
        ("event_loop_unavailable", "uvloop", "asyncio")
    ]
