"""Usage in the governance read model: each owner's ledger (`service.domain.ledger`)
as rows, and every statement on the usage tables (governance_ledgers,
governance_pending_usage, governance_budget_spend, governance_rate_limit_usage,
governance_usage_streams).

An owner's ledger is stored as its budgets' and rate limit's definitions (limit,
reset_duration, calendar_aligned, anchor, usage floor, in governance_budgets and
governance_rate_limits), its clock and pending usage, and its cells: spend and
rate-limit usage keyed as the fold keys them. The fold alone decides what a key
means; this module only loads a ledger without its cells and adds what a run filed
(a reading's cells: `projections.governance_readings`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import asyncpg
import msgspec

from service.domain import ledger
from service.domain.ledger import (
    BUDGET,
    EARLIEST,
    Charge,
    Ledger,
    Pending,
    StoredLedger,
    StoredMeter,
    restore,
    stored,
    take_filed,
    to_money,
    to_nanos,
)
from service.eventstore import Connection

OWNER_TYPES = ("customer", "team", "virtual_key", "provider_config")
RATE_KINDS = ("tokens", "requests")  # a rate limit's halves; columns `token_…` etc.


class Owner(NamedTuple):
    type: str
    id: str

    @property
    def columns(self) -> tuple[str | None, ...]:
        """(customer_id, team_id, virtual_key_id, provider_config_id), one set."""
        return tuple(self.id if self.type == t else None for t in OWNER_TYPES)


# A stored budget or rate limit: its columns by name.
Row = Mapping[str, Any]


class Book(NamedTuple):
    """An owner's ledger and the rows it was restored from (`rate_limit_id` keys its
    rate-limit cells; None while it has no rate limit)."""

    ledger: Ledger
    budgets: list[Row]
    rate_limit: Row | None

    @property
    def rate_limit_id(self) -> int | None:
        return None if self.rate_limit is None else int(self.rate_limit["id"])


class Entry(msgspec.Struct, gc=False):
    """An owner's ledger as the projector keeps it between batches: `rate_limit_id`
    keys its rate-limit cells (None: no rate limit); `pending_stored`: its stored
    pending usage is not empty; `stamp`: the xmin of the governance_ledgers row
    written with it (the row still has it while nobody else wrote the owner)."""

    ledger: Ledger
    rate_limit_id: int | None
    pending_stored: bool
    stamp: int = 0


# --- the limits of a set of owners -------------------------------------------------

# An owner's stored ledger in one row: its clock, its budgets in order, its rate
# limit and its pending usage (one round trip for any number of owners: a read of
# the read model pays per round trip on a busy serving process). The rows come as
# tuples, named here in the order STORED_LEDGERS lists their columns.
_BUDGET_FIELDS = (
    "id",
    "owner_type",
    "owner_id",
    "max_limit",
    "reset_duration",
    "calendar_aligned",
    "anchor",
    "usage_floor",
    "created_at",
)
_RATE_LIMIT_FIELDS = (
    "id",
    "owner_type",
    "owner_id",
    "token_max_limit",
    "token_reset_duration",
    "token_anchor",
    "token_usage_floor",
    "request_max_limit",
    "request_reset_duration",
    "request_anchor",
    "request_usage_floor",
)
STORED_LEDGERS = """
WITH o AS (
    SELECT DISTINCT owner_type, owner_id
    FROM unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
), b AS (
    SELECT owner_type, owner_id,
        array_agg(
            ROW(b.id, b.owner_type, b.owner_id, b.max_limit, b.reset_duration,
                b.calendar_aligned, b.anchor, b.usage_floor, b.created_at)
            ORDER BY b.ordinal
        ) AS budgets
    FROM governance_budgets b JOIN o USING (owner_type, owner_id)
    GROUP BY owner_type, owner_id
), r AS (
    SELECT owner_type, owner_id,
        ROW(r.id, r.owner_type, r.owner_id, r.token_max_limit, r.token_reset_duration,
            r.token_anchor, r.token_usage_floor, r.request_max_limit,
            r.request_reset_duration, r.request_anchor, r.request_usage_floor)
            AS rate_limit
    FROM governance_rate_limits r JOIN o USING (owner_type, owner_id)
), p AS (
    SELECT owner_type, owner_id,
        array_agg(ROW(p.occurred_at, p.cost, p.tokens, p.requests)
            ORDER BY p.occurred_at) AS pending
    FROM governance_pending_usage p JOIN o USING (owner_type, owner_id)
    GROUP BY owner_type, owner_id
)
SELECT owner_type, owner_id, l.clock, b.budgets, r.rate_limit, p.pending
FROM governance_ledgers l JOIN o USING (owner_type, owner_id)
LEFT JOIN b USING (owner_type, owner_id)
LEFT JOIN r USING (owner_type, owner_id)
LEFT JOIN p USING (owner_type, owner_id)
"""
_ALL_LEDGERS = "SELECT owner_type, owner_id FROM governance_ledgers"
_STAMPS_OF = """
SELECT owner_type, owner_id, l.xmin::text::bigint AS stamp FROM governance_ledgers l
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
"""


async def all_owners(conn: Connection) -> list[Owner]:
    """Every owner with a ledger."""
    return [Owner(*r) for r in await conn.fetch(_ALL_LEDGERS)]


async def stamps_of(conn: Connection, owners: Sequence[Owner]) -> dict[Owner, int]:
    """The xmin of the ledger row of each of `owners` that has one: it changes with
    every write of the row, and goes back when a write rolls back."""
    rows = await conn.fetch(_STAMPS_OF, *owner_columns(owners))
    return {Owner(r["owner_type"], r["owner_id"]): r["stamp"] for r in rows}


def owner_columns(owners: Sequence[Owner]) -> tuple[list[str], list[str]]:
    return [o.type for o in owners], [o.id for o in owners]


def stored_meters(budgets: Iterable[Row], rate_limit: Row | None) -> list[StoredMeter]:
    """An owner's meter definitions as its rows hold them (without cells)."""
    found = [
        StoredMeter(
            kind=BUDGET,
            id=b["id"],
            limit=to_nanos(b["max_limit"]),
            reset_duration=b["reset_duration"],
            calendar_aligned=b["calendar_aligned"],
            anchor=b["anchor"],
            floor=b["usage_floor"],
        )
        for b in budgets
    ]
    if rate_limit is not None:
        for kind in RATE_KINDS:
            prefix = kind[:-1]
            if rate_limit[f"{prefix}_max_limit"] is not None:
                found.append(
                    StoredMeter(
                        kind=kind,
                        id=kind,
                        limit=rate_limit[f"{prefix}_max_limit"],
                        reset_duration=rate_limit[f"{prefix}_reset_duration"],
                        calendar_aligned=False,
                        anchor=rate_limit[f"{prefix}_anchor"],
                        floor=rate_limit[f"{prefix}_usage_floor"],
                    )
                )
    return found


async def stored_ledgers(
    conn: Connection, owners: Sequence[Owner]
) -> dict[Owner, tuple[StoredLedger, list[Row], Row | None]]:
    """The ledgers of those `owners` that have one, as stored without cells, with
    their budget rows (in order) and rate-limit row."""
    if not owners:
        return {}
    return dict(map(_stored, await conn.fetch(STORED_LEDGERS, *owner_columns(owners))))


def _stored(
    r: asyncpg.Record,
) -> tuple[Owner, tuple[StoredLedger, list[Row], Row | None]]:
    """A row of STORED_LEDGERS: its owner, ledger, budget rows and rate-limit row."""
    budgets: list[Row] = [
        dict(zip(_BUDGET_FIELDS, b, strict=True)) for b in r["budgets"] or ()
    ]
    rate = r["rate_limit"]
    rate_limit: Row | None = (
        None if rate is None else dict(zip(_RATE_LIMIT_FIELDS, rate, strict=True))
    )
    state = StoredLedger(
        clock=r["clock"],
        meters=tuple(stored_meters(budgets, rate_limit)),
        pending=tuple(
            Pending(at, to_nanos(cost), tokens, requests)
            for at, cost, tokens, requests in r["pending"] or ()
        ),
    )
    return Owner(r["owner_type"], r["owner_id"]), (state, budgets, rate_limit)


def books_in(rows: Iterable[asyncpg.Record], now: datetime) -> dict[Owner, Book]:
    """The books of STORED_LEDGERS' rows (of any statement that has its columns),
    restored without cells (with history: nothing is trimmed), read at `now`."""
    return {
        owner: Book(restore(state, now=now, history=True), budgets, rate)
        for owner, (state, budgets, rate) in map(_stored, rows)
    }


async def books_of(
    conn: Connection, owners: Sequence[Owner], now: datetime = EARLIEST
) -> dict[Owner, Book]:
    """The ledgers of those `owners` that have one, restored without cells (with
    history: nothing is trimmed), read at `now`."""
    if not owners:
        return {}
    return books_in(await conn.fetch(STORED_LEDGERS, *owner_columns(owners)), now)


async def entries_of(
    conn: Connection, owners: Sequence[Owner], stamps: Mapping[Owner, int]
) -> dict[Owner, Entry]:
    """`books_of` as the projector keeps them, stamped with `stamps`."""
    return {
        owner: Entry(
            book.ledger,
            book.rate_limit_id,
            bool(book.ledger.pending),
            stamps[owner],
        )
        for owner, book in (await books_of(conn, owners)).items()
        if owner in stamps
    }


# --- writing a ledger --------------------------------------------------------------

_CREATE_LEDGER = """
INSERT INTO governance_ledgers (customer_id, team_id, virtual_key_id,
    provider_config_id, clock)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (owner_type, owner_id) DO NOTHING
"""
_SET_CLOCKS = """
UPDATE governance_ledgers l SET clock = u.clock
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(owner_type, owner_id, clock)
WHERE l.owner_type = u.owner_type AND l.owner_id = u.owner_id
RETURNING l.owner_type, l.owner_id, l.xmin::text::bigint AS stamp
"""
_DROP_PENDING = """
DELETE FROM governance_pending_usage p
USING unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
WHERE p.owner_type = o.owner_type AND p.owner_id = o.owner_id
"""
_ADD_PENDING = """
INSERT INTO governance_pending_usage (owner_type, owner_id, occurred_at, cost, tokens,
    requests)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[],
    $5::bigint[], $6::bigint[])
"""
# Cells only ever grow: a run adds what it filed; and the usage streams' guard
# moves. One statement (each part runs once, to completion, whether or not the
# others have rows): a batch's round trips are most of its time, and its
# transaction holds every gap-safe reader's horizon back while it writes.
_ADD_CELLS_AND_MARK = """
WITH spend AS (
    INSERT INTO governance_budget_spend AS s (budget_id, period_start, spend)
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::numeric[])
    ON CONFLICT (budget_id, period_start) DO UPDATE SET spend = s.spend + EXCLUDED.spend
), used AS (
    INSERT INTO governance_rate_limit_usage AS u (rate_limit_id, kind, period_start,
        used)
    SELECT * FROM unnest($4::bigint[], $5::text[], $6::timestamptz[], $7::bigint[])
    ON CONFLICT (rate_limit_id, kind, period_start)
    DO UPDATE SET used = u.used + EXCLUDED.used
)
INSERT INTO governance_usage_streams AS g (stream_id, last_tx_id, last_position)
SELECT * FROM unnest($8::text[], $9::xid8[], $10::bigint[])
ON CONFLICT (stream_id) DO UPDATE
SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position
"""


async def create_ledger(conn: Connection, owner: Owner, clock: datetime) -> None:
    await conn.execute(_CREATE_LEDGER, *owner.columns, clock)


async def write(
    conn: Connection,
    entries: Mapping[Owner, Entry],
    marks: Mapping[str, tuple[int, int]],
) -> None:
    """Write what folding changed: each ledger's clock and pending usage, the cells
    it filed (taken, so they are added once), and the (tx_id, position) each usage
    stream is now charged up to (`marks`); stamps each entry with its row's new
    xmin. An owner whose ledger row is gone (deleted with the owner since it was
    taken) has nothing written: its rows went with it."""
    owners = sorted(entries)
    stamps: dict[Owner, int] = {}
    if owners:
        rows = await conn.fetch(
            _SET_CLOCKS,
            [o.type for o in owners],
            [o.id for o in owners],
            [entries[o].ledger.clock for o in owners],
        )
        stamps = {Owner(r["owner_type"], r["owner_id"]): r["stamp"] for r in rows}
    spend: dict[tuple[str, datetime], int] = {}
    used: dict[tuple[int, str, datetime], int] = {}
    pending: list[tuple[str, str, datetime, object, int, int]] = []
    dropped: list[Owner] = []
    for owner in owners:
        entry = entries[owner]
        folded = entry.ledger
        taken = take_filed(folded)
        entry.stamp = stamps.get(owner, 0)
        if not entry.stamp:
            continue
        limit_id = entry.rate_limit_id
        for kind, meter_id, key, amount in taken:
            if not amount:
                continue
            if kind == BUDGET:
                spend[meter_id, key] = spend.get((meter_id, key), 0) + amount
            elif limit_id is not None:
                slot = (limit_id, kind, key)
                used[slot] = used.get(slot, 0) + amount
        if entry.pending_stored:
            dropped.append(owner)
        if folded.pending:
            pending.extend(
                (
                    owner.type,
                    owner.id,
                    p.occurred_at,
                    to_money(p.cost),
                    p.tokens,
                    p.requests,
                )
                for p in stored(folded).pending
            )
        entry.pending_stored = bool(folded.pending)
    if dropped:
        await conn.execute(_DROP_PENDING, *owner_columns(dropped))
    if pending:
        await conn.execute(_ADD_PENDING, *map(list, zip(*pending, strict=True)))
    if spend or used or marks:
        keys, slots, streams = sorted(spend), sorted(used), sorted(marks)
        await conn.execute(
            _ADD_CELLS_AND_MARK,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [to_money(spend[k]) for k in keys],
            [s[0] for s in slots],
            [s[1] for s in slots],
            [s[2] for s in slots],
            [used[s] for s in slots],
            streams,
            [marks[s][0] for s in streams],
            [marks[s][1] for s in streams],
        )


# --- charging usage ----------------------------------------------------------------

_CHARGED_UP_TO = """
SELECT stream_id, last_tx_id, last_position FROM governance_usage_streams
WHERE stream_id = ANY($1::text[])
"""


# The names a usage record charges: key, provider config, team, customer.
Names = tuple[str, str | None, str | None, str | None]


def chain_of(names: Names) -> list[Owner]:
    """The owners a record names: its key, provider config, team and customer."""
    key, provider_config, team, customer = names
    owners = [Owner("virtual_key", key)]
    if provider_config is not None:
        owners.append(Owner("provider_config", provider_config))
    if team is not None:
        owners.append(Owner("team", team))
    if customer is not None:
        owners.append(Owner("customer", customer))
    return owners


class Charged(ledger.Usage, Protocol):
    """What the usage streams' guard and the chain read of a usage record (a
    UsageRecorded, or the UsageCharge a bulk read decodes)."""

    @property
    def virtual_key_id(self) -> str: ...
    @property
    def provider_config_id(self) -> str | None: ...
    @property
    def team_id(self) -> str | None: ...
    @property
    def customer_id(self) -> str | None: ...
    @property
    def reservation_id(self) -> str | None: ...


def group(charges: Sequence[tuple[Names, Charge]]) -> dict[Names, list[Charge]]:
    """The records of each set of names, in log order."""
    groups: dict[Names, list[Charge]] = {}
    for names, charge in charges:
        found = groups.get(names)
        if found is None:
            groups[names] = [charge]
        else:
            found.append(charge)
    return groups


def fold(
    charges: Sequence[tuple[Names, Charge]],
    groups: Mapping[Names, list[Charge]],
    ledgers: Mapping[Names, Sequence[Ledger]],
) -> None:
    """Charge each record to the ledgers of the owners it names (`groups`: the
    records `group`ed; `ledgers`: those that exist, for at least every set of names
    in `groups`), each ledger its records in order: the fold alone decides what
    moves. The records of each set of names are summed once (`ledger.run_of`) and
    each ledger takes its sums at once when none of its records needs a decision
    (`ledger.charge_runs`); a ledger that does folds its records in log order
    (`ledger.charge_all`)."""
    runs = {names: ledger.run_of(records) for names, records in groups.items()}
    named: dict[int, tuple[Ledger, list[Names]]] = {}
    for names, owned in ledgers.items():
        if names in runs:  # else no record names them: nothing to fold
            for folded in owned:
                named.setdefault(id(folded), (folded, []))[1].append(names)
    ordered: dict[int, tuple[Ledger, list[Charge]]] = {}
    for folded, names_of in named.values():
        if ledger.charge_runs(folded, [runs[names] for names in names_of]):
            continue
        if len(names_of) == 1:  # its records are one set's, in log order
            ledger.charge_all(folded, groups[names_of[0]])
        else:
            ordered[id(folded)] = (folded, [])
    if not ordered:
        return
    chains = {
        names: adds
        for names, owned in ledgers.items()
        if (adds := [ordered[id(f)][1].append for f in owned if id(f) in ordered])
    }
    for names, charge in charges:
        for add in chains.get(names, ()):
            add(charge)
    for folded, run in ordered.values():
        ledger.charge_all(folded, run)


async def charged_up_to(
    conn: Connection, streams: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """The (tx_id, position) each usage stream is charged up to (the version guard
    of usage streams), for those charged before."""
    return {
        row["stream_id"]: (int(row["last_tx_id"]), row["last_position"])
        for row in await conn.fetch(_CHARGED_UP_TO, list(streams))
    }
