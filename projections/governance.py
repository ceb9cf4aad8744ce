"""The governance read model's apply: events fold into the governance_* tables
(customers, teams, virtual keys, provider configs, budgets, rate limits), and runs of
usage are charged by `projections.governance_usage`. The GET side is
`projections.governance_reads`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import assert_never, cast

import asyncpg

from projections import governance_holds
from projections.governance_books import Books
from projections.governance_limits import (
    BUDGET_CONFLICT,
    INSERT_BUDGETS,
    INSERT_RATE_LIMIT,
    RATE_LIMIT_CONFLICT,
    define,
    halves,
)
from projections.governance_usage import Owner
from projections.runner import ApplyRows
from service import eventstore
from service.domain.events import (
    AnyEvent,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerUpdated,
    ProviderConfig,
    ReservationHeld,
    ReservationReleased,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
    UsageCharge,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyDeleted,
    VirtualKeyUpdated,
)
from service.domain.ledger import (
    Ledger,
    define_budgets,
    define_rate_limit,
    open_ledger,
    to_money,
)
from service.eventstore import Connection
from service.records import RecordedEvent, Refused

# The live projector's ledgers (`govledger project`, or the serving process's).
_BOOKS = Books()

# --- apply -------------------------------------------------------------------------


async def apply(
    conn: Connection,
    records: Sequence[RecordedEvent],
    books: Books | None = None,
    *,
    flush: bool = True,
) -> None:
    """Fold a batch into the tables; the caller owns the transaction.

    Runs of UsageRecorded are charged together, runs of created owners of one type
    are written together (`_create`); every other event is applied on its own, in
    log order, so usage is charged against the budgets as they stood.
    Ledgers are kept in `books` between batches (by default the process's own);
    without `flush` what usage moved stays there, unwritten, until a later
    `books.flush` (a replay's bulk phase).
    """
    async with _batch(conn, books, flush) as batch:
        await batch.books.expect(
            conn, [r.stream_id for r in records if isinstance(r.event, UsageRecorded)]
        )
        for record in records:
            event = record.event
            if isinstance(event, UsageRecorded):
                batch.books.add([_row_of(record)], [event])
            else:
                await batch.event(record)


def _row_of(record: RecordedEvent) -> dict[str, object]:
    """A usage record's place as `Books.add` reads it from a row."""
    return {
        "stream_id": record.stream_id,
        "tx_id": record.tx_id,
        "global_position": record.global_position,
        "recorded_at": record.recorded_at,
    }


async def apply_rows(
    conn: Connection,
    rows: Sequence[asyncpg.Record],
    books: Books | None = None,
    *,
    flush: bool = True,
) -> list[Refused]:
    """`apply` of rows as `eventstore.read_rows` reads them: a usage row is decoded
    only into what it charges (first, all at once), and each run of usage rows
    between two other events goes to the books in one call; every other row is
    decoded into its record and applied in its turn.
    Returns the rows refused (legacy events with no current form), passed over as
    every reader passes over them."""
    refused: list[Refused] = []
    usages = eventstore.usages_of(rows)
    async with _batch(conn, books, flush) as batch:
        await batch.books.expect(
            conn,
            [
                row["stream_id"]
                for row, u in zip(rows, usages, strict=True)
                if u is not None
            ],
        )
        others = [i for i, u in enumerate(usages) if u is None]
        start = 0
        for end in [*others, len(rows)]:
            if start < end:  # a run of usage rows: no None among its usages
                run = cast("list[UsageCharge]", usages[start:end])
                batch.books.add(rows[start:end], run)
            if end < len(rows):
                read = eventstore.record_or_refused(rows[end])
                if isinstance(read, Refused):
                    refused.append(read)
                else:
                    await batch.event(read)
            start = end + 1
    return refused


# The live projector's apply (`govledger project`, or the serving process's).
APPLIER = ApplyRows(apply_rows)


@contextlib.asynccontextmanager
async def _batch(
    conn: Connection, books: Books | None, flush: bool
) -> AsyncIterator[_Batch]:
    """A batch on `books` (by default the process's own): what it leaves open is
    charged and written at its end (without `flush`, left in the books); a failure
    forgets everything the books hold."""
    if books is None:
        # Two applies at once in one process (tests): the second keeps nothing.
        books = Books() if _BOOKS.busy else _BOOKS
    books.busy = True
    try:
        batch = _Batch(conn, books)
        yield batch
        await batch.close()
        if flush:
            await books.flush(conn)
            books.end_batch()
    except BaseException:
        books.forget()
        raise
    finally:
        books.busy = False


class _Batch:
    """The events of a batch in log order, usage added to the books as it comes:
    a run of created owners of one type is written when the run ends, the usage
    added since the last other event is charged before that event applies."""

    def __init__(self, conn: Connection, books: Books) -> None:
        self.conn = conn
        self.books = books
        self._created: list[RecordedEvent] = []  # a run of created owners of one type
        self._named: set[tuple[str, str]] = set()  # the owners and budgets it names

    async def event(self, record: RecordedEvent) -> None:
        """Apply an event that is not usage, after the usage added before it."""
        if self.books.adding:
            await self.close()
        event = record.event
        if isinstance(event, _CREATED):
            names = _names(event)
            created = self._created
            if created and (
                type(event) is not type(created[0].event)
                or not self._named.isdisjoint(names)
            ):
                await self._write_created()
            self._created.append(record)
            self._named.update(names)
            return
        await self._write_created()
        await _apply_event(self.conn, self.books, record)

    async def close(self) -> None:
        """Write the run of created owners, then charge the usage added after it."""
        await self._write_created()
        holding = await self.books.charge(self.conn)
        await governance_holds.settle(self.conn, holding)

    async def _write_created(self) -> None:
        if self._created:
            await _create(self.conn, self.books, self._created)
            self._created, self._named = [], set()


async def _apply_event(conn: Connection, books: Books, record: RecordedEvent) -> None:
    e, v, at = record.event, record.stream_version, record.recorded_at
    match e:
        case CustomerCreated() | TeamCreated() | VirtualKeyCreated():
            await _create(conn, books, [record])
        case CustomerUpdated():
            if await _wrote(conn, _UPDATE_CUSTOMER, e.customer_id, v, at, e.name):
                owner = Owner("customer", e.customer_id)
                await define(conn, books, owner, v, at, rate_limit=e.rate_limit)
        case CustomerBudgetsReplaced():
            if await _wrote(conn, _TOUCH["customer"], e.customer_id, v, at):
                owner = Owner("customer", e.customer_id)
                await define(conn, books, owner, v, at, e.budgets)
        case CustomerDeleted():
            # Its ledger goes with it (cascade): write what is open first.
            await books.flush(conn)
            await conn.execute(_DELETE_CUSTOMER, e.customer_id, v)
            books.drop(Owner("customer", e.customer_id))
        case TeamUpdated():
            if await _wrote(conn, _UPDATE_TEAM, *_team_row(e, v, at)):
                owner = Owner("team", e.team_id)
                await define(conn, books, owner, v, at, rate_limit=e.rate_limit)
        case TeamBudgetsReplaced():
            if await _wrote(conn, _TOUCH["team"], e.team_id, v, at):
                await define(conn, books, Owner("team", e.team_id), v, at, e.budgets)
        case TeamDeleted():
            await books.flush(conn)
            await conn.execute(_DELETE_TEAM, e.team_id, v)
            books.drop(Owner("team", e.team_id))
        case VirtualKeyUpdated():
            if await _wrote(conn, _UPDATE_VIRTUAL_KEY, *_key_row(e, v, at)):
                owner = Owner("virtual_key", e.virtual_key_id)
                await define(conn, books, owner, v, at, rate_limit=e.rate_limit)
                await _set_key_settings(conn, books, owner, e, v, at)
        case VirtualKeyBudgetsReplaced():
            if await _wrote(conn, _TOUCH["virtual_key"], e.virtual_key_id, v, at):
                owner = Owner("virtual_key", e.virtual_key_id)
                await define(conn, books, owner, v, at, e.budgets)
        case VirtualKeyDeleted():
            # Cascades to its budgets, rate limit, provider configs and theirs.
            await books.flush(conn)
            await conn.execute(_DELETE_VIRTUAL_KEY, e.virtual_key_id, v)
            await governance_holds.drop_key(conn, e.virtual_key_id)
            books.drop(Owner("virtual_key", e.virtual_key_id))
        case ReservationHeld():
            await governance_holds.hold(conn, e, record.global_position)
        case ReservationReleased():
            await governance_holds.release(conn, e.reservation_id, e.virtual_key_id)
        case UsageRecorded():
            raise AssertionError("usage is charged in runs by charge")
        case _:
            assert_never(e)


async def _wrote(conn: Connection, sql: str, *args: object) -> bool:
    """Run an INSERT/UPDATE; False when it wrote nothing (already applied, or gone)."""
    return not (await conn.execute(sql, *args)).endswith(" 0")


def _team_row(
    e: TeamCreated | TeamUpdated, version: int, at: datetime
) -> tuple[object, ...]:
    return (e.team_id, version, at, e.name, e.customer_id)


def _key_row(
    e: VirtualKeyCreated | VirtualKeyUpdated, version: int, at: datetime
) -> tuple[object, ...]:
    return (
        e.virtual_key_id,
        version,
        at,
        e.name,
        e.value_sha256,
        e.value_hint,
        e.team_id,
        e.customer_id,
        e.is_active,
    )


async def _set_key_settings(
    conn: Connection,
    books: Books,
    owner: Owner,
    e: VirtualKeyCreated | VirtualKeyUpdated,
    version: int,
    at: datetime,
    *,
    new: bool = False,
) -> None:
    """The key's provider configs; `new`: the key was inserted just now, so it has
    none yet (they reference it), and none need deleting."""
    await _replace_provider_configs(
        conn, books, owner.id, e.provider_configs, version, at, new=new
    )


# --- created owners ----------------------------------------------------------------

_CREATED = (CustomerCreated, TeamCreated, VirtualKeyCreated)
Created = CustomerCreated | TeamCreated | VirtualKeyCreated


def _owner_of(e: Created) -> Owner:
    match e:
        case CustomerCreated():
            return Owner("customer", e.customer_id)
        case TeamCreated():
            return Owner("team", e.team_id)
        case VirtualKeyCreated():
            return Owner("virtual_key", e.virtual_key_id)
        case _:
            assert_never(e)


def _names(e: Created) -> list[tuple[str, str]]:
    """The rows a created owner's statements name: it, and its budgets (a run of
    creates writes each of them once: ON CONFLICT may not meet a row twice)."""
    return [("owner", _owner_of(e).id), *(("budget", b.budget_id) for b in e.budgets)]


async def _create(conn: Connection, books: Books, run: Sequence[RecordedEvent]) -> None:
    """A run of created owners of one type, none (and none of their budgets) named
    twice: each owner that is new is inserted with its ledger row (those already
    there are left alone, as re-applied events), then the new owners' budgets and
    rate limits in one statement, their ledgers folded as `_define` folds them.
    Two statements for the run, whatever its length."""
    rows = [_created_row(record) for record in run]
    sql = _INSERT_CREATED[type(run[0].event)]
    inserted = {r["id"] for r in await conn.fetch(sql, *_arrays(rows, 0))}
    if not inserted:
        return
    new: list[tuple[RecordedEvent, Created, Owner, Ledger]] = []
    budgets: list[tuple[object, ...]] = []
    limits: list[tuple[object, ...]] = []
    for record in run:
        e = record.event
        assert isinstance(e, _CREATED)
        owner = _owner_of(e)
        if owner.id not in inserted:
            continue
        v, at = record.stream_version, record.recorded_at
        ledger = open_ledger(at, history=True)
        define_budgets(ledger, e.budgets, at)
        budgets += [
            (
                *owner.columns,
                v,
                at,
                m.id,
                to_money(m.limit),
                m.reset_duration,
                m.calendar_aligned,
                m.anchor,
                m.floor,
                ordinal,
            )
            for ordinal, m in enumerate(ledger.budgets, 1)
        ]
        define_rate_limit(ledger, e.rate_limit, at)
        if e.rate_limit is not None:
            limits.append((*owner.columns, v, at, *halves(ledger)))
        new.append((record, e, owner, ledger))
    found: dict[str, int] = {}
    if budgets or limits:
        written = await conn.fetch(
            _INSERT_BUDGETS_AND_RATE_LIMITS,
            *_arrays(budgets, 13),
            *_arrays(limits, 14),
        )
        found = {r["owner_id"]: int(r["id"]) for r in written}
    for record, e, owner, ledger in new:
        entry = books.open(owner, ledger)
        entry.rate_limit_id = found.get(owner.id)
        if isinstance(e, VirtualKeyCreated) and e.provider_configs:
            v, at = record.stream_version, record.recorded_at
            await _set_key_settings(conn, books, owner, e, v, at, new=True)


def _arrays(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as the columns unnest takes (`width` empty ones for no rows)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _created_row(record: RecordedEvent) -> tuple[object, ...]:
    """A created owner's row as its _INSERT_CREATED statement takes it."""
    e, v, at = record.event, record.stream_version, record.recorded_at
    match e:
        case CustomerCreated():
            return (e.customer_id, v, at, e.name)
        case TeamCreated():
            return _team_row(e, v, at)
        case VirtualKeyCreated():
            return _key_row(e, v, at)
        case _:
            raise AssertionError(f"not a created owner: {type(e).__name__}")


# Arrays of the rows (id, stream version, recorded_at, then the fields): an owner is
# inserted once, with its ledger row (its clock at its recorded_at); returns the ids
# inserted. A parent that does not exist (any more) is stored as NULL: dangling
# tolerated.
_INSERT_CUSTOMERS = """
WITH o AS (
    INSERT INTO governance_customers (id, version, created_at, updated_at, name)
    SELECT u.id, u.version, u.at, u.at, u.name
    FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[])
        AS u(id, version, at, name)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at
), l AS (
    INSERT INTO governance_ledgers (customer_id, clock) SELECT id, created_at FROM o
)
SELECT id FROM o
"""
_INSERT_TEAMS = """
WITH o AS (
    INSERT INTO governance_teams (id, version, created_at, updated_at, name,
        customer_id)
    SELECT u.id, u.version, u.at, u.at, u.name,
        (SELECT c.id FROM governance_customers c WHERE c.id = u.customer_id)
    FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[])
        AS u(id, version, at, name, customer_id)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at
), l AS (
    INSERT INTO governance_ledgers (team_id, clock) SELECT id, created_at FROM o
)
SELECT id FROM o
"""
_INSERT_VIRTUAL_KEYS = """
WITH o AS (
    INSERT INTO governance_virtual_keys (id, version, created_at, updated_at, name,
        value_sha256, value_hint, team_id, customer_id, is_active)
    SELECT u.id, u.version, u.at, u.at, u.name, u.value_sha256, u.value_hint,
        (SELECT t.id FROM governance_teams t WHERE t.id = u.team_id),
        (SELECT c.id FROM governance_customers c WHERE c.id = u.customer_id),
        u.is_active
    FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::boolean[])
        AS u(id, version, at, name, value_sha256, value_hint, team_id, customer_id,
            is_active)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at
), l AS (
    INSERT INTO governance_ledgers (virtual_key_id, clock)
    SELECT id, created_at FROM o
)
SELECT id FROM o
"""
# New owners' budgets (rows as governance_limits writes them) and rate limits (the
# owner's columns, version, recorded_at, the halves): the upserts of
# governance_limits; returns each rate limit's owner_id and id.
_NEW_BUDGETS = """
    SELECT u.id, u.customer_id, u.team_id, u.virtual_key_id, u.provider_config_id,
        u.version, u.at, u.at, u.max_limit, u.reset_duration, u.calendar_aligned,
        u.anchor, u.usage_floor, u.ordinal
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
        $6::timestamptz[], $7::text[], $8::numeric[], $9::text[], $10::boolean[],
        $11::timestamptz[], $12::timestamptz[], $13::integer[])
        AS u(customer_id, team_id, virtual_key_id, provider_config_id, version, at,
            id, max_limit, reset_duration, calendar_aligned, anchor, usage_floor,
            ordinal)
"""
_NEW_RATE_LIMITS = """
SELECT u.customer_id, u.team_id, u.virtual_key_id, u.provider_config_id, u.version,
    u.at, u.at, u.token_max_limit, u.token_reset_duration, u.token_anchor,
    u.token_usage_floor, u.request_max_limit, u.request_reset_duration,
    u.request_anchor, u.request_usage_floor
FROM unnest($14::text[], $15::text[], $16::text[], $17::text[], $18::bigint[],
    $19::timestamptz[], $20::bigint[], $21::text[], $22::timestamptz[],
    $23::timestamptz[], $24::bigint[], $25::text[], $26::timestamptz[],
    $27::timestamptz[])
    AS u(customer_id, team_id, virtual_key_id, provider_config_id, version, at,
        token_max_limit, token_reset_duration, token_anchor, token_usage_floor,
        request_max_limit, request_reset_duration, request_anchor,
        request_usage_floor)
"""
_INSERT_BUDGETS_AND_RATE_LIMITS = (
    "WITH b AS ("
    + INSERT_BUDGETS
    + _NEW_BUDGETS
    + BUDGET_CONFLICT
    + ")"
    + INSERT_RATE_LIMIT
    + _NEW_RATE_LIMITS
    + RATE_LIMIT_CONFLICT
    + "RETURNING r.owner_id, r.id"
)
_INSERT_CREATED: dict[type[AnyEvent], str] = {
    CustomerCreated: _INSERT_CUSTOMERS,
    TeamCreated: _INSERT_TEAMS,
    VirtualKeyCreated: _INSERT_VIRTUAL_KEYS,
}
_UPDATE_CUSTOMER = """
UPDATE governance_customers SET version = $2, updated_at = $3, name = $4
WHERE id = $1 AND version < $2
"""
_DELETE_CUSTOMER = "DELETE FROM governance_customers WHERE id = $1 AND version < $2"

# $1 id, $2 stream version, $3 recorded_at, then the fields: an update applies only
# to an older row (the version guard).
_UPDATE_TEAM = """
UPDATE governance_teams SET version = $2, updated_at = $3, name = $4,
    customer_id = (SELECT id FROM governance_customers WHERE id = $5)
WHERE id = $1 AND version < $2
"""
_DELETE_TEAM = "DELETE FROM governance_teams WHERE id = $1 AND version < $2"

_UPDATE_VIRTUAL_KEY = """
UPDATE governance_virtual_keys SET version = $2, updated_at = $3, name = $4,
    value_sha256 = $5, value_hint = $6,
    team_id = (SELECT id FROM governance_teams WHERE id = $7),
    customer_id = (SELECT id FROM governance_customers WHERE id = $8),
    is_active = $9
WHERE id = $1 AND version < $2
"""
_DELETE_VIRTUAL_KEY = (
    "DELETE FROM governance_virtual_keys WHERE id = $1 AND version < $2"
)

_TOUCH = {
    "customer": "UPDATE governance_customers SET version = $2, updated_at = $3"
    " WHERE id = $1 AND version < $2",
    "team": "UPDATE governance_teams SET version = $2, updated_at = $3"
    " WHERE id = $1 AND version < $2",
    "virtual_key": "UPDATE governance_virtual_keys SET version = $2, updated_at = $3"
    " WHERE id = $1 AND version < $2",
}


# --- provider configs --------------------------------------------------------------

_DELETE_DROPPED_PROVIDER_CONFIGS = """
DELETE FROM governance_provider_configs
WHERE virtual_key_id = $1 AND id <> ALL($2::text[])
RETURNING id
"""
_UPSERT_PROVIDER_CONFIG = """
INSERT INTO governance_provider_configs AS p (id, version, created_at, updated_at,
    virtual_key_id, provider, allowed_models, ordinal)
VALUES ($1, $2, $3, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at, provider = EXCLUDED.provider,
    allowed_models = EXCLUDED.allowed_models, ordinal = EXCLUDED.ordinal
WHERE p.version < EXCLUDED.version
"""


async def _replace_provider_configs(
    conn: Connection,
    books: Books,
    virtual_key_id: str,
    configs: Sequence[ProviderConfig],
    version: int,
    at: datetime,
    *,
    new: bool = False,
) -> None:
    """The key's provider configs become exactly `configs` (kept by their id)."""
    if not new:
        ids = [c.provider_config_id for c in configs]
        dropped = await conn.fetch(
            _DELETE_DROPPED_PROVIDER_CONFIGS, virtual_key_id, ids
        )
        for row in dropped:  # their ledgers went with them (cascade)
            books.drop(Owner("provider_config", row["id"]))
    for ordinal, config in enumerate(configs):
        models = None if config.allowed_models is None else list(config.allowed_models)
        await conn.execute(
            _UPSERT_PROVIDER_CONFIG,
            config.provider_config_id,
            version,
            at,
            virtual_key_id,
            config.provider,
            models,
            ordinal,
        )
        owner = Owner("provider_config", config.provider_config_id)
        await define(conn, books, owner, version, at, config.budgets, config.rate_limit)
