"""What a reading of the read model at a moment sums, in one round trip: the stored
cells of the periods that contain it (`service.domain.ledger.period_keys`), added to
the ledgers restored without them (`projections.governance_usage.books_of`), and
what the holds open at that moment keep of the budgets and rate limits it is asked
about (`Holders`).

A read of the read model pays per round trip on a busy serving process: a GET reads
its ledgers in one statement and what they sum here, in one more.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from projections.governance_usage import Book, Owner
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


async def read_at(
    conn: Connection, books: Mapping[Owner, Book], at: datetime, holders: Holders
) -> Held:
    """Add to each meter of `books` the stored cells a reading at `at` sums, and
    return what the holds open at `at` keep of the limits of `holders`."""
    spend_keys: list[tuple[str, datetime]] = []
    rate_keys: list[tuple[int, str, datetime]] = []
    for book in books.values():
        for meter in meters(book.ledger):
            keys = period_keys(meter, at)
            if meter.kind == BUDGET:
                spend_keys.extend((meter.id, key) for key in keys)
            elif (limit_id := book.rate_limit_id) is not None:
                rate_keys.extend((limit_id, meter.kind, key) for key in keys)
    budget_ids, rate_owner_ids = holders
    if not spend_keys and not rate_keys and not budget_ids and not rate_owner_ids:
        return Held({}, {})
    row = await conn.fetchrow(
        _READING,
        [k[0] for k in spend_keys],
        [k[1] for k in spend_keys],
        [k[0] for k in rate_keys],
        [k[1] for k in rate_keys],
        [k[2] for k in rate_keys],
        budget_ids,
        rate_owner_ids,
        at,
    )
    assert row is not None
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
