"""The group-commit writer and record screening, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from service import eventstore
from service.domain.events import UsageRecorded
from service.domain.usage import (
    Row,
    UsageChain,
    UsageRecord,
    decode_lines,
    encode_usage,
    screen,
)
from service.errors import Unavailable
from service.ingest import Outcome, Writer
from tests.builders import (
    CONFIG_ID,
    CUSTOMER_ID,
    KEY_ID,
    SECRET,
    SOLO_KEY_ID,
    TEAM_ID,
    governance,
    sha256,
    usage_event,
)

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def usage(cost: str = "0.01", key_id: str = KEY_ID) -> UsageRecorded:
    return usage_event(key_id, cost, NOW)


def row(event_id: str | None = None, cost: str = "0.01") -> Row:
    event_id = event_id or str(uuid.uuid4())
    return Row(
        uuid.UUID(event_id).int,
        event_id,
        f"usage-{KEY_ID}",
        encode_usage(usage(cost)),
    )


async def until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Wait for a condition that in-process or database progress makes true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (
        await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
    ):
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def events_locked(dsn: str) -> AsyncIterator[None]:
    """Hold a lock on `events` that makes every COPY wait until the block ends."""
    conn = await asyncpg.connect(dsn)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
    try:
        yield
    finally:
        await transaction.rollback()
        await conn.close()


async def blocked_on_lock(pool, writer: Writer) -> None:
    async def waiting() -> bool:
        state = await pool.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
            writer.backend_pid,
        )
        return bool(state == "Lock")

    await until(waiting)


@pytest.fixture
async def writer(database) -> AsyncIterator[Writer]:
    # The rules of a group commit, one lane at a time (lanes: below).
    writer = Writer(database, lanes=1)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.close()


async def stored(pool) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT event_id::text, global_position, stream_version, tx_id::text"
            " FROM events WHERE type = 'UsageRecorded' ORDER BY global_position"
        )
    )


# --- decoding NDJSON ----------------------------------------------------------------


def line(event_id: str, **fields: object) -> bytes:
    record = {
        "event_id": event_id,
        "virtual_key": SECRET,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": "0.01",
        **fields,
    }
    return msgspec.json.encode(record)


E1, E2, E3 = (f"e0000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))


def test_decode_lines_numbers_every_record_by_its_line():
    body = line(E1) + b"\n" + line(E2) + b"\n"

    records, bad = decode_lines(body)

    assert [(n, r.event_id) for n, r in records] == [(1, E1), (2, E2)]
    assert bad == []


def test_decode_lines_skips_blank_lines_and_keeps_line_numbers():
    body = b"\n  \r\n" + line(E1) + b"\r\n\n" + line(E2)

    records, bad = decode_lines(body)

    assert [(n, r.event_id) for n, r in records] == [(3, E1), (5, E2)]
    assert bad == []


def test_decode_lines_rejects_a_line_that_is_not_json_and_keeps_the_others():
    body = line(E1) + b"\nnot json\n" + line(E2) + b'\n{"event_id": 5}\n'

    records, bad = decode_lines(body)

    assert [(n, r.event_id) for n, r in records] == [(1, E1), (3, E2)]
    assert [(r.where, r.why.code) for r in bad] == [
        (2, "invalid_record"),
        (4, "invalid_record"),
    ]
    assert bad[0].why.message.startswith("the record is not valid JSON")


def test_decode_lines_refuses_a_record_split_over_lines_or_two_on_one_line():
    split = line(E1).replace(b'"provider"', b'\n"provider"')
    body = line(E2) + b" " + line(E3) + b"\n" + split + b"\n" + line(E1)

    records, bad = decode_lines(body)

    assert [(n, r.event_id) for n, r in records] == [(4, E1)]
    assert [r.where for r in bad] == [1, 2, 3]


# --- screening ----------------------------------------------------------------------


async def test_screen_resolves_the_chain_and_rejects_with_codes(pool):
    cache = await governance(pool)
    future = NOW + timedelta(minutes=5, seconds=1)
    records = [
        UsageRecord(
            event_id=E1,
            virtual_key=SECRET,
            provider="openai",
            model="m",
            cost=Decimal("0.5"),
        ),
        UsageRecord(
            event_id=E2,
            virtual_key="sk-gl-unknown",
            provider="openai",
            model="m",
            cost=Decimal(1),
        ),
        UsageRecord(
            event_id=E3,
            virtual_key_id=SOLO_KEY_ID,
            provider="anthropic",
            model="m",
            cost=Decimal("-0.1"),
        ),
        UsageRecord(
            event_id=E3,
            virtual_key_id=SOLO_KEY_ID,
            provider="anthropic",
            model="m",
            cost=Decimal(1),
            occurred_at=future,
        ),
        UsageRecord(
            event_id=E3,
            virtual_key_id=SOLO_KEY_ID,
            provider="anthropic",
            model="m",
            cost=Decimal(2),
            input_tokens=7,
        ),
    ]

    screened = screen(list(enumerate(records, 1)), cache, NOW)

    assert [(r.where, r.why.code) for r in screened.rejected] == [
        (2, "unknown_virtual_key"),
        (3, "negative_cost"),
        (4, "occurred_at_out_of_range"),
    ]
    assert [
        (r.event_id, r.stream_id, msgspec.json.decode(r.data, type=UsageRecorded))
        for r in screened.rows
    ] == [
        (
            E1,
            f"usage-{KEY_ID}",
            UsageRecorded(
                virtual_key_id=KEY_ID,
                provider="openai",
                model="m",
                cost=Decimal("0.5"),
                occurred_at=NOW,
                provider_config_id=CONFIG_ID,
                team_id=TEAM_ID,
                customer_id=CUSTOMER_ID,
            ),
        ),
        (
            E3,
            f"usage-{SOLO_KEY_ID}",
            UsageRecorded(
                virtual_key_id=SOLO_KEY_ID,
                provider="anthropic",
                model="m",
                cost=Decimal(2),
                input_tokens=7,
                occurred_at=NOW,
                customer_id=CUSTOMER_ID,
            ),
        ),
    ]


def test_screen_asks_the_resolver_once_per_key_and_provider():
    class CountingResolver:
        def __init__(self) -> None:
            self.calls: list[tuple[str | None, str | None, str]] = []

        def resolve_usage(self, *, virtual_key_sha256, virtual_key_id, provider):
            self.calls.append((virtual_key_sha256, virtual_key_id, provider))
            return UsageChain(KEY_ID, None, None, None)

    resolver = CountingResolver()
    records = [
        (
            i,
            UsageRecord(
                event_id=str(uuid.uuid4()),
                virtual_key=SECRET,
                provider=provider,
                model="m",
                cost=Decimal(1),
            ),
        )
        for i, provider in enumerate(["openai", "openai", "azure", "openai"])
    ]

    screened = screen(records, resolver, NOW)

    assert len(screened.rows) == 4
    assert resolver.calls == [
        (sha256(SECRET), None, "openai"),
        (sha256(SECRET), None, "azure"),
    ]


def test_encode_usage_writes_the_data_column_of_the_event_store():
    event = UsageRecorded(
        virtual_key_id=KEY_ID,
        provider="openai",
        model="gpt-4o",
        cost=Decimal("0.000000001"),
        input_tokens=3,
        output_tokens=4,
        requests=0,
        occurred_at=NOW,
        provider_config_id=CONFIG_ID,
        team_id=TEAM_ID,
        customer_id=CUSTOMER_ID,
    )

    assert encode_usage(event) == eventstore.encode_event(event)


# --- the writer ---------------------------------------------------------------------


async def test_written_rows_are_usage_events_whose_version_is_their_position(
    pool, writer
):
    rows = [row(E1, cost="0.25"), row(E2, cost="0.5")]

    outcomes = await writer.write(rows, b'{"request_id": "r1"}')

    assert [o.duplicate for o in outcomes] == [False, False]
    version, events = await eventstore.read_stream(pool, f"usage-{KEY_ID}")
    assert [(e.event_id, e.global_position, e.stream_version) for e in events] == [
        (E1, outcomes[0].position, outcomes[0].position),
        (E2, outcomes[1].position, outcomes[1].position),
    ]
    assert [e.event for e in events] == [usage("0.25"), usage("0.5")]
    assert [e.metadata for e in events] == [{"request_id": "r1"}] * 2
    assert version == outcomes[1].position


async def test_a_repeat_within_one_group_is_a_duplicate_of_the_first(pool, writer):
    outcomes = await writer.write([row(E1), row(E2), row(E1)])

    assert outcomes == [
        Outcome(outcomes[0].position, False),
        Outcome(outcomes[1].position, False),
        Outcome(outcomes[0].position, True),
    ]
    assert len(await stored(pool)) == 2


async def test_a_repeat_of_a_written_id_gets_the_original_position(pool, writer):
    [first] = await writer.write([row(E1)])

    again = await writer.write([row(E2), row(E1)])

    assert again == [Outcome(again[0].position, False), Outcome(first.position, True)]
    assert [r["event_id"] for r in await stored(pool)] == [E1, E2]


async def test_ids_stored_by_another_writer_are_found_through_the_unique_index(
    database, pool, writer
):
    [first] = await writer.write([row(E1)])
    other = Writer(database)  # its memory of recent ids is empty
    await other.start()
    try:
        outcomes = await other.write([row(E2), row(E1), row(E3), row(E1)])
    finally:
        await other.close()

    assert outcomes == [
        Outcome(outcomes[0].position, False),
        Outcome(first.position, True),
        Outcome(outcomes[2].position, False),
        Outcome(first.position, True),
    ]
    rows = await stored(pool)
    assert [r["event_id"] for r in rows] == [E1, E2, E3]
    assert [r["stream_version"] for r in rows] == [r["global_position"] for r in rows]


async def test_records_of_concurrent_senders_share_one_transaction(
    database, pool, writer
):
    async with events_locked(database):
        first = asyncio.create_task(writer.write([row()]))
        await blocked_on_lock(pool, writer)
        senders = [asyncio.create_task(writer.write([row(), row()])) for _ in range(5)]
        await until(lambda: writer.backlog == 10)
    await first
    answers = await asyncio.gather(*senders)

    tx_of = {r["global_position"]: r["tx_id"] for r in await stored(pool)}
    assert len(tx_of) == 11
    assert len({tx_of[o.position] for a in answers for o in a}) == 1
    assert tx_of[first.result()[0].position] != tx_of[answers[0][0].position]


async def test_a_record_the_server_refuses_fails_only_its_own_sender(
    database, pool, writer
):
    # jsonb refuses U+0000 (validation keeps such records out; this is the backstop).
    poisoned = Row(uuid.UUID(E3).int, E3, f"usage-{KEY_ID}", b'{"model": "a\\u0000"}')
    async with events_locked(database):
        first = asyncio.create_task(writer.write([row()]))
        await blocked_on_lock(pool, writer)
        good = asyncio.create_task(writer.write([row(E1), row(E2)]))
        bad = asyncio.create_task(writer.write([poisoned]))
        await until(lambda: writer.backlog == 3)
    await first

    assert [o.duplicate for o in await good] == [False, False]
    with pytest.raises(Unavailable):
        await bad
    assert {r["event_id"] for r in await stored(pool)} >= {E1, E2}
    assert E3 not in {r["event_id"] for r in await stored(pool)}


async def test_max_wait_gathers_senders_that_arrive_within_it(database, pool):
    writer = Writer(database, max_wait=0.5, lanes=1)
    await writer.start()
    try:
        first = await writer.submit([row(E1)])
        assert writer.backlog == 1
        await until(lambda: writer.backlog == 0)  # taken; the writer waits for more
        [second] = await writer.write([row(E2)])
        [first_outcome] = await first.outcomes()
    finally:
        await writer.close()

    tx_of = {r["global_position"]: r["tx_id"] for r in await stored(pool)}
    assert tx_of[first_outcome.position] == tx_of[second.position]


async def test_a_group_never_exceeds_group_max(database, pool):
    writer = Writer(database, group_max=10, lanes=1)
    await writer.start()
    try:
        outcomes = await writer.write([row() for _ in range(25)])
    finally:
        await writer.close()

    assert [o.duplicate for o in outcomes] == [False] * 25
    sizes = await pool.fetch(
        "SELECT count(*) AS n FROM events GROUP BY tx_id ORDER BY min(global_position)"
    )
    assert [r["n"] for r in sizes] == [10, 10, 5]


async def test_a_full_queue_makes_senders_wait_and_loses_nothing(database, pool):
    writer = Writer(database, group_max=5, queue_limit=2, lanes=1)
    await writer.start()
    try:
        async with events_locked(database):
            first = asyncio.create_task(writer.write([row()]))
            await blocked_on_lock(pool, writer)
            senders = [
                asyncio.create_task(writer.write([row() for _ in range(5)]))
                for _ in range(10)
            ]
            await until(lambda: writer.backlog == 10)
            for _ in range(50):  # plenty of turns for every sender to try to queue
                await asyncio.sleep(0)
            assert writer.backlog == 10  # 2 chunks of 5: the other senders wait
            assert sum(not s.done() for s in senders) == 10
        await first
        answers = await asyncio.gather(*senders)
    finally:
        await writer.close()

    assert sum(len(a) for a in answers) == 50
    assert len(await stored(pool)) == 51


async def test_a_lost_connection_fails_the_group_and_the_writer_reconnects(
    database, pool, writer
):
    async with events_locked(database):
        pending = asyncio.create_task(writer.write([row(E1)]))
        await blocked_on_lock(pool, writer)
        await pool.execute("SELECT pg_terminate_backend($1)", writer.backend_pid)
        with pytest.raises(Unavailable):
            await pending
    assert await stored(pool) == []

    writer._lanes[0].retry_at = 0  # skip the reconnect back-off
    [outcome] = await writer.write([row(E1)])

    assert outcome.duplicate is False
    assert [r["event_id"] for r in await stored(pool)] == [E1]


async def test_close_commits_what_is_queued_and_then_refuses(database, pool):
    writer = Writer(database)
    await writer.start()
    submitted = await writer.submit([row(E1), row(E2)])

    await writer.close()

    assert [o.duplicate for o in await submitted.outcomes()] == [False, False]
    assert len(await stored(pool)) == 2
    with pytest.raises(Unavailable):
        await writer.write([row(E3)])


async def test_close_answers_a_group_it_cannot_commit_in_time(database, pool):
    writer = Writer(database, lanes=1)
    await writer.start()
    async with events_locked(database):
        pending = asyncio.create_task(writer.write([row(E1)]))
        await blocked_on_lock(pool, writer)
        await writer.close(grace=0.1)
        with pytest.raises(Unavailable):
            await pending
    assert await stored(pool) == []


# --- lanes ----------------------------------------------------------------------------


def lanes_blocked(pool, writer: Writer, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether `count` of the writer's lanes wait for a lock (for `until`)."""

    async def blocked() -> bool:
        states = await pool.fetch(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = ANY($1::int[])",
            [pid for pid in writer.backend_pids if pid is not None],
        )
        return sum(r["wait_event_type"] == "Lock" for r in states) == count

    return blocked


async def test_a_second_lane_copies_the_next_group_while_the_first_waits(
    database, pool
):
    writer = Writer(database, lanes=2, group_max=10)  # spills from 5 queued
    await writer.start()
    try:
        async with events_locked(database):
            first = asyncio.create_task(writer.write([row(E1)]))
            await until(lanes_blocked(pool, writer, 1))
            six = [row(E2), *(row() for _ in range(5))]
            second = asyncio.create_task(writer.write(six))
            await until(lanes_blocked(pool, writer, 2))
            third = asyncio.create_task(writer.write([row(E3), row()]))
            await until(lambda: writer.backlog == 2)  # no lane free: it queues
        answers = [await first, await second, await third]
    finally:
        await writer.close()

    tx_of = {r["global_position"]: r["tx_id"] for r in await stored(pool)}
    groups = [{tx_of[o.position] for o in a} for a in answers]
    assert len(tx_of) == 9
    assert [len(g) for g in groups] == [1, 1, 1]
    assert len(set.union(*groups)) == 3  # three groups, two of them at once


async def test_below_the_spill_the_second_lane_leaves_the_records_to_one_group(
    database, pool
):
    writer = Writer(database, lanes=2, group_max=10)
    await writer.start()
    try:
        async with events_locked(database):
            first = asyncio.create_task(writer.write([row(E1)]))
            await until(lanes_blocked(pool, writer, 1))
            senders = [
                asyncio.create_task(writer.write([row(), row()])) for _ in range(2)
            ]
            await until(lambda: writer.backlog == 4)
            for _ in range(50):  # turns for an idle lane to (wrongly) take them
                await asyncio.sleep(0)
            assert writer.backlog == 4
            assert await lanes_blocked(pool, writer, 1)()
        await first
        answers = await asyncio.gather(*senders)
    finally:
        await writer.close()

    tx_of = {r["global_position"]: r["tx_id"] for r in await stored(pool)}
    assert len({tx_of[o.position] for a in answers for o in a}) == 1


async def test_lanes_writing_the_same_ids_in_opposite_orders_both_commit(
    database, pool
):
    """Two groups holding the same ids (a batch resent while in flight), copied at
    once: every lane copies in id order, so one waits for the other and finds its
    ids stored; copied as sent, they could wait for each other (a deadlock)."""
    ids = [str(uuid.UUID(int=n << 64)) for n in range(1, 401)]
    writer = Writer(database, lanes=2, group_max=500)  # spills from 250 queued
    await writer.start()
    try:
        async with events_locked(database):
            ascending = asyncio.create_task(writer.write([row(i) for i in ids]))
            await until(lanes_blocked(pool, writer, 1))
            descending = asyncio.create_task(
                writer.write([row(i) for i in reversed(ids)])
            )
            await until(lanes_blocked(pool, writer, 2))
        up, down = await ascending, await descending
    finally:
        await writer.close()

    position_of = {r["event_id"]: r["global_position"] for r in await stored(pool)}
    assert len(position_of) == 400
    assert [o.position for o in up] == [position_of[i] for i in ids]
    assert [o.position for o in down] == [position_of[i] for i in reversed(ids)]
    # Every id was stored once, by one of the two; the other found it stored.
    assert sorted(o.duplicate for o in up + down) == [False] * 400 + [True] * 400
