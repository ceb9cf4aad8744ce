"""Replay: events/s rebuilding the governance read model from a generated log, beside
a raw keyset read of the same rows decoded into the event structs.

The log is made fast: owners (customers, teams, keys, each with 3 budgets; keys with
a rate limit) through `eventstore.append`, then usage by binary COPY, 10,000 rows a
transaction, every record naming an existing key, team and customer, so each one is
charged to 9 budgets and a rate limit when it is applied.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import msgspec

from projections import replay
from service import eventstore
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerCreated,
    RateLimit,
    TeamCreated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.records import Checkpoint, NewEvent

DURATIONS = ("1d", "1M", "1Y")
PAGE = 2000  # rows a page of the raw read (the rebuild: replay.BULK_BATCH)
COPY_ROWS = 10_000  # usage rows a transaction
_COLUMNS = (
    "global_position",
    "stream_version",
    "event_id",
    "stream_id",
    "type",
    "schema_version",
    "data",
    "metadata",
)


class Chain(msgspec.Struct, frozen=True):
    """A key and the owners its usage names."""

    virtual_key_id: str
    team_id: str
    customer_id: str


class Log(msgspec.Struct, kw_only=True):
    """What was generated so far."""

    chains: list[Chain]
    owner_events: int
    usage_events: int = 0

    @property
    def events(self) -> int:
        return self.owner_events + self.usage_events


def _budgets() -> tuple[Budget, ...]:
    return tuple(
        Budget(
            budget_id=str(uuid.uuid4()),
            max_limit=Decimal(10**9),
            reset_duration=duration,
        )
        for duration in DURATIONS
    )


async def create_owners(
    dsn: str, *, keys: int = 1000, teams: int = 100, customers: int = 10
) -> Log:
    """Owners through the event store, one append (one transaction) each."""
    customer_ids = [str(uuid.uuid4()) for _ in range(customers)]
    team_ids = [str(uuid.uuid4()) for _ in range(teams)]
    appends: list[tuple[str, AnyEvent]] = [
        (
            f"customer-{c}",
            CustomerCreated(customer_id=c, name=f"c{i}", budgets=_budgets()),
        )
        for i, c in enumerate(customer_ids)
    ]
    appends += [
        (
            f"team-{t}",
            TeamCreated(
                team_id=t,
                name=f"t{i}",
                customer_id=customer_ids[i % customers],
                budgets=_budgets(),
            ),
        )
        for i, t in enumerate(team_ids)
    ]
    chains: list[Chain] = []
    for i in range(keys):
        key_id = str(uuid.uuid4())
        team = i % teams
        chains.append(Chain(key_id, team_ids[team], customer_ids[team % customers]))
        appends.append(
            (
                f"virtual_key-{key_id}",
                VirtualKeyCreated(
                    virtual_key_id=key_id,
                    name=f"k{i}",
                    value_sha256=uuid.uuid4().hex * 2,
                    value_hint="abcd",
                    team_id=team_ids[team],
                    budgets=_budgets(),
                    rate_limit=RateLimit(
                        token_max_limit=10**12,
                        token_reset_duration="1h",
                        request_max_limit=10**9,
                        request_reset_duration="1h",
                    ),
                ),
            )
        )
    conn = await asyncpg.connect(dsn)
    try:
        await eventstore.init_connection(conn)
        for stream_id, event in appends:
            await eventstore.append(conn, stream_id, 0, [NewEvent(event=event)])
    finally:
        await conn.close()
    return Log(chains=chains, owner_events=len(appends))


async def append_usage(dsn: str, log: Log, count: int) -> float:
    """COPY `count` usage events over the log's keys; returns rows/s."""
    occurred_at = datetime.now(UTC)
    payloads = [
        eventstore.encode_event(
            UsageRecorded(
                virtual_key_id=chain.virtual_key_id,
                provider="openai",
                model="gpt-4o",
                cost=Decimal("0.000123"),
                input_tokens=100,
                output_tokens=20,
                occurred_at=occurred_at,
                team_id=chain.team_id,
                customer_id=chain.customer_id,
            )
        )
        for chain in log.chains
    ]
    streams = [f"usage-{chain.virtual_key_id}" for chain in log.chains]
    base = uuid.uuid4().int & ~((1 << 64) - 1)
    conn = await asyncpg.connect(dsn)
    try:
        await eventstore.init_connection(conn)
        sequence = await conn.fetchval(
            "SELECT pg_get_serial_sequence('events', 'global_position')"
        )
        started = time.perf_counter()
        done = 0
        while done < count:
            n = min(COPY_ROWS, count - done)
            # Reserve n positions: usage streams are unversioned (version = position).
            first = await conn.fetchval(
                "SELECT setval($1::regclass, nextval($1::regclass) + $2 - 1) - $2 + 1",
                sequence,
                n,
            )
            records = []
            for j in range(n):
                position = first + j
                k = (log.usage_events + done + j) % len(payloads)
                records.append(
                    (
                        position,
                        position,
                        uuid.UUID(int=base | (log.usage_events + done + j)),
                        streams[k],
                        "UsageRecorded",
                        UsageRecorded.schema_version,
                        payloads[k],
                        b"{}",
                    )
                )
            await conn.copy_records_to_table(
                "events", records=records, columns=_COLUMNS
            )
            done += n
        rate = count / (time.perf_counter() - started)
        await conn.execute("VACUUM (ANALYZE) events")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    log.usage_events += count
    return rate


async def raw_read(pool: asyncpg.Pool) -> tuple[int, float]:
    """(events, events/s) of a keyset read of the whole log in (tx_id, position)
    order, pages of PAGE rows, each row's data decoded into its event struct."""
    decode = eventstore.decode_event
    total = 0
    after = Checkpoint()
    async with pool.acquire() as conn:
        started = time.perf_counter()
        while True:
            rows = await eventstore.read_all_rows(conn, after, PAGE)
            if not rows:
                break
            for row in rows:
                decode(row["type"], row["schema_version"], row["data"])
            last = rows[-1]
            after = Checkpoint(int(last["tx_id"]), last["global_position"])
            total += len(rows)
        elapsed = time.perf_counter() - started
    return total, total / elapsed


async def warm_up(pool: asyncpg.Pool) -> None:
    """Both sides once, unmeasured: the page cache, plans, this process's heap (a
    first rebuild in a process ran 0.32-0.41 of its raw read, later ones 0.38-0.53,
    in old and new code alike)."""
    await raw_read(pool)
    await rebuild(pool)


async def rebuild(pool: asyncpg.Pool) -> tuple[int, float]:
    """(events, events/s) of `projections.replay.rebuild` of the governance model."""
    started = time.perf_counter()
    report = await replay.rebuild(pool, "governance")
    elapsed = time.perf_counter() - started
    if not report.swapped:
        raise RuntimeError("the rebuild did not swap its tables in")
    return report.events, report.events / elapsed


async def spend_of(pool: asyncpg.Pool) -> Decimal:
    """Total spend in the read model: a replay that did no work shows 0."""
    value = await pool.fetchval(
        "SELECT coalesce(sum(spend), 0) FROM governance_budget_spend"
    )
    return Decimal(value)
