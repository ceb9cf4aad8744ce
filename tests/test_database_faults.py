"""PostgreSQL stopped and started again under load, and the LISTEN connection killed:
a real `govledger serve` on a dedicated cluster (stopping it must not disturb the
other tests' cluster). While the database is down, usage and commands get a prompt
503 `database_unavailable` (never a 500, never a hang), checks keep answering from
the cache marked `"stale": true`; once it is back the service reconnects by itself
and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import inspect
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from service import pgcluster
from service.migrate import migrate
from tests.served import (
    BUDGETS,
    CHECK,
    TEAMS,
    Fleet,
    Hierarchy,
    call,
    hierarchy,
    known_to_cache,
    post_batch,
    usage,
)

# Durable commits (synchronous_commit on) but no fsync: a clean stop loses nothing.
SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_connections": "100"}
# No answer may take longer than this while the database is down.
ANSWER_BOUND_S = 5.0
# The service must be back (usage acknowledged, commands applied, checks fresh)
# within this long after PostgreSQL accepts connections again.
RECOVERY_BOUND_S = 5.0
UNAVAILABLE = "database_unavailable"


@dataclass
class Cluster:
    data_dir: Path
    dsn: str

    async def stop(self) -> None:
        await asyncio.to_thread(pgcluster.stop, self.data_dir)

    async def start(self) -> None:
        dsn = await asyncio.to_thread(
            pgcluster.ensure_started, self.data_dir, settings=SETTINGS
        )
        assert dsn == self.dsn


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    """A PostgreSQL of this module alone, migrated; stopped and removed at the end."""
    data_dir = Path(tempfile.mkdtemp(prefix="govledger-faults-"))
    try:
        dsn = await asyncio.to_thread(
            pgcluster.ensure_started, data_dir, settings=SETTINGS
        )
        await migrate(dsn)
        yield Cluster(data_dir, dsn)
    finally:
        try:
            await asyncio.to_thread(pgcluster.stop, data_dir)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fleet(cluster: Cluster) -> Any:
    with Fleet(cluster.dsn) as fleet:
        yield fleet


@dataclass
class Load:
    """Usage POSTed one record at a time and in small batches, until stopped; every
    answer is classified and timed."""

    session: aiohttp.ClientSession
    url: str
    key: dict[str, Any]
    occurred_at: str
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # 503 database_unavailable
    unexpected: list[tuple[int, Any]] = field(default_factory=list)
    slowest_s: float = 0.0

    def new(self) -> dict[str, Any]:
        record = usage(self.key, f"0.{random.randint(1, 999):03d}", self.occurred_at)
        self.sent[record["event_id"]] = record
        return record

    def acked_more_than(self, count: int, task: asyncio.Task[None]) -> bool:
        """Whether more than `count` records were acknowledged; the recorder must
        still be running (it stops at the first unexpected answer)."""
        if task.done():
            raise AssertionError(f"the recorder stopped: {self.unexpected}")
        return len(self.acked) > count

    async def run(self, stop: asyncio.Event, at_most: int = 50_000) -> None:
        for turn in range(at_most):
            if stop.is_set():
                return
            records = [self.new() for _ in range(1 if turn % 4 else 20)]
            started = time.monotonic()
            if len(records) == 1:
                status, answer = await call(
                    self.session, "POST", self.url + "/api/usage", records[0]
                )
                ok = status == 202
            else:
                status, answer = await post_batch(self.session, self.url, records)
                ok = status == 200 and answer["rejected"] == []
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            ids = {r["event_id"] for r in records}
            if ok:
                self.acked |= ids
            elif status == 503 and answer["error"]["code"] == UNAVAILABLE:
                self.refused |= ids
                await asyncio.sleep(0.01)  # a recorder's retry pause, not a wait
            else:
                self.unexpected.append((status, answer))
                return


async def until(
    probe: Any, what: str, bound_s: float = RECOVERY_BOUND_S
) -> tuple[Any, float]:
    """Poll `probe()` (sync or async; a bounded observation of another process or
    task) until it returns something truthy; that value and how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value, time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {bound_s} s")


async def expect_unavailable(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> None:
    started = time.monotonic()
    status, answer = await call(session, method, url, body, within_s=ANSWER_BOUND_S)
    assert (status, answer["error"]["code"]) == (503, UNAVAILABLE), answer
    assert time.monotonic() - started < ANSWER_BOUND_S


async def expect_stream_unavailable(
    session: aiohttp.ClientSession, url: str, record: dict[str, Any]
) -> None:
    """On the usage WebSocket a frame that cannot be taken while the database is
    down is an error frame naming it, with its seq, and the socket stays open: a
    frame whose key the cache does not know (the refresh cannot reach the log) and
    one whose records are all rejected (its ack's position cannot be read). An HTTP
    503 used to be written into the upgraded socket."""
    unknown = {**record, "virtual_key": "sk-gl-no-such-key-while-down"}
    unknown.pop("virtual_key_id", None)
    refused = {**record, "cost": "-1"}
    async with session.ws_connect(url + "/api/usage/stream") as ws:
        for seq, element in ((1, unknown), (2, refused)):
            await ws.send_json({"seq": seq, "records": [element]})
            answer = await ws.receive_json(timeout=ANSWER_BOUND_S)
            assert answer["seq"] == seq, answer
            assert answer["error"]["code"] == UNAVAILABLE, answer
        assert not ws.closed


async def stored_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_id::text FROM events WHERE type = 'UsageRecorded'"
        )
    finally:
        await conn.close()
    return {r["event_id"] for r in rows}


async def outages(
    cluster: Cluster,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    *,
    count: int,
    down_s: tuple[float, float],
) -> dict[str, Any]:
    served = fleet.start(name="faults")
    await served.ready(session)
    url = served.url
    tree: Hierarchy = await hierarchy(
        session, url, keys=1, key_limit=10**9, team_limit=10**9, customer_limit=10**9
    )
    await known_to_cache(session, url, tree)
    key = tree.keys[0]
    occurred_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    load = Load(session, url, key, occurred_at)
    stop = asyncio.Event()
    recorder = asyncio.create_task(load.run(stop))
    check = {"virtual_key": key["value"]}
    recoveries: list[float] = []
    try:
        for _ in range(count):
            acked_before = len(load.acked)
            await until(
                lambda n=acked_before: load.acked_more_than(n + 20, recorder),
                "usage acknowledged before the outage",
            )
            await cluster.stop()
            # Down: usage, commands and reads are refused at once, and say why.
            record = load.new()
            await expect_unavailable(session, "POST", url + "/api/usage", record)
            load.refused.add(record["event_id"])
            await expect_stream_unavailable(
                session, url, usage(key, "0.5", occurred_at)
            )
            await expect_unavailable(session, "POST", url + TEAMS, {"name": "down"})
            await expect_unavailable(session, "GET", url + TEAMS)
            # A check that must wait for a position cannot look it up: 503 too.
            await expect_unavailable(
                session, "POST", url + CHECK, {**check, "min_position": 10**9}
            )
            # Checks keep answering from the cache, flagged stale once it knows.
            stale, _ = await until(
                lambda: _stale_answer(session, url + CHECK, check),
                "a stale check answer",
                bound_s=ANSWER_BOUND_S,
            )
            assert (stale["allowed"], stale["reason"], stale["stale"]) == (
                True,
                "ok",
                True,
            )
            await asyncio.sleep(random.uniform(*down_s))  # the outage itself
            await cluster.start()
            started = time.monotonic()
            # Back: the service reconnects on its own.
            acked_now = len(load.acked)
            await until(
                lambda n=acked_now: load.acked_more_than(n, recorder),
                "usage acknowledged after the outage",
            )
            status, created = await call(session, "POST", url + TEAMS, {"name": "up"})
            assert status == 201, created
            fresh, _ = await until(
                lambda p=created["position"]: _fresh_answer(
                    session, url + CHECK, {**check, "min_position": p}
                ),
                "a fresh check answer",
            )
            recoveries.append(time.monotonic() - started)
            assert "stale" not in fresh
    finally:
        stop.set()
        await asyncio.wait_for(recorder, ANSWER_BOUND_S * 3)
    assert load.unexpected == []
    assert load.slowest_s < ANSWER_BOUND_S

    # Nothing acknowledged was lost; every refused record is stored once resent.
    stored = await stored_ids(cluster.dsn)
    assert load.acked <= stored
    retry = [load.sent[i] for i in sorted(load.refused - stored)]
    if retry:
        status, answer = await post_batch(session, url, retry)
        assert (status, answer["accepted"], answer["rejected"]) == (
            200,
            len(retry),
            [],
        )
    stored = await stored_ids(cluster.dsn)
    assert stored == set(load.sent)
    spent = sum(Decimal(r["cost"]) for r in load.sent.values())
    head = await _head(cluster.dsn)
    status, answer = await call(
        session,
        "GET",
        f"{url}{BUDGETS}?owner_type=virtual_key&owner_id={key['id']}&min_position={head}",
    )
    assert status == 200, answer
    [key_budget] = answer["budgets"]
    assert Decimal(str(key_budget["current_usage"])) == spent
    fresh = await _fresh_answer(session, url + CHECK, {**check, "min_position": head})
    assert fresh is not None
    assert Decimal(str(fresh["remaining"])) == 10**9 - spent
    # No request failed inside the service: every refusal was a 503 with its code.
    assert [
        line for line in served.log_lines() if line.get("event") == "request_failed"
    ] == []
    return {
        "outages": count,
        "acknowledged": len(load.acked),
        "refused": len(load.refused),
        "recovery_s": max(recoveries),
        "slowest_answer_s": load.slowest_s,
    }


async def _stale_answer(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    status, answer = await call(session, "POST", url, body, within_s=ANSWER_BOUND_S)
    assert status == 200, answer
    return answer if answer.get("stale") else None


async def _fresh_answer(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    status, answer = await call(session, "POST", url, body, within_s=ANSWER_BOUND_S)
    if status != 200 or answer.get("stale"):
        return None
    return dict(answer)


async def _head(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT max(global_position) FROM events"))
    finally:
        await conn.close()


async def test_a_database_outage_refuses_with_503_serves_stale_checks_and_loses_no_ack(
    cluster, fleet, session
):
    figures = await outages(cluster, fleet, session, count=1, down_s=(1.5, 2.5))
    assert figures["acknowledged"] > 0


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_soak_repeated_database_outages_lose_nothing(
    cluster, fleet, session, capsys
):
    figures = await outages(cluster, fleet, session, count=8, down_s=(1.0, 8.0))
    with capsys.disabled():
        print(f"\nsoak database outages: {figures}")


async def test_a_killed_listen_connection_is_replaced_and_projections_keep_up(
    cluster, fleet, session
):
    served = fleet.start(name="listener")
    await served.ready(session)
    conn = await asyncpg.connect(cluster.dsn)
    try:

        async def listener_pid(other_than: int | None = None) -> int | None:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                " AND query ILIKE 'LISTEN%' AND pid IS DISTINCT FROM $2",
                served.name,
                other_than,
            )
            return None if pid is None else int(pid)

        pid, _ = await until(listener_pid, "the LISTEN connection")
        for round_ in range(3):
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            # Commands right after the loss are projected all the same: the read
            # model and the cache reach their positions within min_position's wait.
            status, team = await call(
                session, "POST", served.url + TEAMS, {"name": f"team-{round_}"}
            )
            assert status == 201, team
            position, team_id = team["position"], team["team"]["id"]
            status, read = await call(
                session,
                "GET",
                f"{served.url}{TEAMS}/{team_id}?min_position={position}",
            )
            assert (status, read["team"]["name"]) == (200, f"team-{round_}")
            status, key = await call(
                session,
                "POST",
                served.url + "/api/governance/virtual-keys",
                {"name": "k", "team_id": team_id},
            )
            assert status == 201, key
            status, checked = await call(
                session,
                "POST",
                served.url + CHECK,
                {
                    "virtual_key": key["virtual_key"]["value"],
                    "min_position": key["position"],
                },
            )
            assert (status, checked["allowed"], checked.get("stale")) == (
                200,
                True,
                None,
            )
            # And the process listens again, on a new connection.
            pid, _ = await until(
                lambda old=pid: listener_pid(other_than=old), "a new LISTEN connection"
            )
    finally:
        await conn.close()
