"""What a reading of the read model at a moment sums, in one round trip: the stored
cells of the periods that contain it (`service.domain.ledger.period_keys`), added to
the ledgers restored without them (`projections.governance_usage.books_of`), and
what the holds open at that moment keep of the budgets and rate limits it is asked
about (`Holders`).

A read of the read model pays per round trip on a busy serving process: a GET reads
its ledgers in one statement and what they sum here, in one more, both in one
read-only transaction (BEGIN and COMMIT: four round trips). A read of one owner
that asks for the keys and holders its last reading asked for (`Remembered`) reads
the ledger and the reading in one statement instead (`read_owner`: one snapshot
without a transaction), and keeps it only when the ledger it read asks for exactly
those: one round trip.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from projections.governance_usage import (
    STORED_LEDGERS,
    Book,
    Owner,
    books_in,
    owner_columns,
)
from service.domain.ledger import BUDGET, meters, period_keys, to_nanos
from service.eventstore import Connection

# The cells of the periods, budgets' and rate limits', and what open holds keep of
# each budget (by id) and of each rate-limit owner (tokens, requests). A hold's
# arrays are GIN-indexed: `&&` finds the holds of those ids through the index.
_READING = """
SELECT
    ARRAY(
        SELECT ROW(s.budget_id, s.period_start, s.spend)
        FROM governance_budget_spend s
        JOIN unnest($1::text[], $2::timestamptz[]) AS k(budget_id, period_start)
            USING (budget_id, period_start)
    ) AS spend,
    ARRAY(
        SELECT ROW(u.rate_limit_id, u.kind, u.period_start, u.used)
        FROM governance_rate_limit_usage u
        JOIN unnest($3::bigint[], $4::text[], $5::timestamptz[])
            AS k(rate_limit_id, kind, period_start)
            USING (rate_limit_id, kind, period_start)
    ) AS used,
    ARRAY(
        SELECT ROW(b.budget_id, sum(h.amount))
        FROM governance_holds h, unnest(h.budget_ids) AS b (budget_id)
        WHERE h.budget_ids && $6::text[] AND h.expires_at > $8
            AND b.budget_id = ANY($6::text[])
        GROUP BY b.budget_id
    ) AS held_budgets,
    ARRAY(
        SELECT ROW(o.owner_id, sum(h.tokens), count(*))
        FROM governance_holds h, unnest(h.rate_owner_ids) AS o (owner_id)
        WHERE h.rate_owner_ids && $7::text[] AND h.expires_at > $8
            AND o.owner_id = ANY($7::text[])
        GROUP BY o.owner_id
    ) AS held_rate
"""


# _READING with its parameters numbered from $3 ($1 → $3, …).
_READING_AFTER_TWO = re.sub(r"[$]([0-9]+)", lambda m: f"${int(m[1]) + 2}", _READING)
# One owner's ledger (STORED_LEDGERS, $1 and $2) and a reading (_READING, its
# parameters from $3 on) in one statement: one snapshot. No ledger: no row.
_AT_ONCE = f"""
WITH reading AS ({_READING_AFTER_TWO})
SELECT stored.*, reading.* FROM ({STORED_LEDGERS}) AS stored, reading
"""


class Holders(NamedTuple):
    """The limits whose open holds a reading sums: budgets by id, and rate limits by
    their owner's id."""

    budget_ids: list[str]
    rate_owner_ids: list[str]


def holders_of(books: Mapping[Owner, Book]) -> Holders:
    """The budgets and rate limits `books` were restored with."""
    return Holders(
        [r["id"] for book in books.values() for r in book.budgets],
        [
            r["owner_id"]
            for book in books.values()
            if (r := book.rate_limit) is not None
        ],
    )


class Held(NamedTuple):
    """What open holds keep: by budget id, and by rate-limit owner id (tokens,
    requests)."""

    budgets: dict[str, Decimal]
    rate_owners: dict[str, tuple[int, int]]

    def of_budget(self, budget_id: str) -> Decimal:
        return self.budgets.get(budget_id, Decimal(0))

    def of_rate_limit(self, owner_id: str) -> tuple[int, int]:
        """(tokens, requests) held on the rate limit of the owner `owner_id`."""
        return self.rate_owners.get(owner_id, (0, 0))


class Asked(NamedTuple):
    """What a reading asks the database for: the cells' keys, budgets' (budget id,
    key) and rate limits' (rate limit id, kind, key), and the holders."""

    spend_keys: list[tuple[str, datetime]]
    rate_keys: list[tuple[int, str, datetime]]
    holders: Holders

    def __bool__(self) -> bool:
        return bool(
            self.spend_keys or self.rate_keys or self.holders[0] or self.holders[1]
        )

    def arguments(self, at: datetime) -> tuple[Sequence[Any] | datetime, ...]:
        """_READING's parameters, for a reading at `at`."""
        spend, rate = self.spend_keys, self.rate_keys
        return (
            [k[0] for k in spend],
            [k[1] for k in spend],
            [k[0] for k in rate],
            [k[1] for k in rate],
            [k[2] for k in rate],
            *self.holders,
            at,
        )


def asked_at(books: Mapping[Owner, Book], at: datetime, holders: Holders) -> Asked:
    """What a reading of `books` at `at` asks for, with what holds keep of `holders`."""
    spend_keys: list[tuple[str, datetime]] = []
    rate_keys: list[tuple[int, str, datetime]] = []
    for book in books.values():
        for meter in meters(book.ledger):
            keys = period_keys(meter, at)
            if meter.kind == BUDGET:
                spend_keys.extend((meter.id, key) for key in keys)
            elif (limit_id := book.rate_limit_id) is not None:
                rate_keys.extend((limit_id, meter.kind, key) for key in keys)
    return Asked(spend_keys, rate_keys, holders)


async def read_at(
    conn: Connection, books: Mapping[Owner, Book], at: datetime, holders: Holders
) -> Held:
    """Add to each meter of `books` the stored cells a reading at `at` sums, and
    return what the holds open at `at` keep of the limits of `holders`."""
    return await read_asked(conn, books, at, asked_at(books, at, holders))


async def read_asked(
    conn: Connection, books: Mapping[Owner, Book], at: datetime, asked: Asked
) -> Held:
    """`read_at` of what `asked_at` found it asks for."""
    if not asked:
        return Held({}, {})
    row = await conn.fetchrow(_READING, *asked.arguments(at))
    assert row is not None
    return _taken(books, row)


class Remembered:
    """What the last reading of each owner asked for, at most `capacity` owners (the
    least recently remembered forgotten first)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._asked: dict[Owner, Asked] = {}

    def get(self, owner: Owner) -> Asked | None:
        return self._asked.get(owner)

    def put(self, owner: Owner, asked: Asked) -> None:
        self._asked.pop(owner, None)
        if len(self._asked) >= self._capacity:
            del self._asked[next(iter(self._asked))]
        self._asked[owner] = asked


async def read_owner(
    conn: Connection, owner: Owner, at: datetime, remembered: Remembered
) -> tuple[dict[Owner, Book], Held] | None:
    """`owner`'s book (none: no ledger) with the cells a reading at `at` sums, and
    what open holds keep of its limits, in one statement; None when its last
    reading is not remembered or its ledger now asks for other keys or holders
    (read it with `books_of` and `read_asked` in one snapshot, and remember)."""
    asked = remembered.get(owner)
    if asked is None:
        return None
    rows = await conn.fetch(_AT_ONCE, *owner_columns([owner]), *asked.arguments(at))
    books = books_in(rows, at)
    if asked_at(books, at, holders_of(books)) != asked:
        return None
    return books, (_taken(books, rows[0]) if rows else Held({}, {}))


def _taken(books: Mapping[Owner, Book], row: Any) -> Held:
    """Add a reading's cells to `books`; what its holds keep."""
    _add_cells(books, row["spend"], row["used"])
    return Held(
        {budget_id: amount for budget_id, amount in row["held_budgets"]},
        {
            owner_id: (int(tokens), int(requests))
            for owner_id, tokens, requests in row["held_rate"]
        },
    )


def _add_cells(
    books: Mapping[Owner, Book],
    spend_rows: list[tuple[str, datetime, Decimal]],
    used_rows: list[tuple[int, str, datetime, int]],
) -> None:
    spend: dict[str, dict[datetime, int]] = {}
    for budget_id, key, money in spend_rows:
        spend.setdefault(budget_id, {})[key] = to_nanos(money)
    used: dict[tuple[int, str], dict[datetime, int]] = {}
    for limit_id, kind, key, count in used_rows:
        used.setdefault((limit_id, kind), {})[key] = count
    for book in books.values():
        for meter in meters(book.ledger):
            if meter.kind == BUDGET:
                found = spend.get(meter.id, {})
            else:
                found = used.get((book.rate_limit_id or 0, meter.kind), {})
            for key, amount in found.items():
                meter.cells[key] = meter.cells.get(key, 0) + amount
