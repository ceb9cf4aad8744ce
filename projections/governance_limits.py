"""An owner's budgets and rate limit in the governance read model: a definition
event folds into the owner's ledger (`service.domain.ledger`) and the definitions it
yields (limits, anchors, floors) are stored in governance_budgets and
governance_rate_limits. `projections.governance` applies the events.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from msgspec import UNSET, UnsetType

from projections.governance_books import Books
from projections.governance_usage import Owner, create_ledger
from service.domain.events import Budget, RateLimit
from service.domain.ledger import (
    Ledger,
    Transition,
    define_budgets,
    define_rate_limit,
    open_ledger,
    to_money,
)
from service.eventstore import Connection


async def define(
    conn: Connection,
    books: Books,
    owner: Owner,
    version: int,
    at: datetime,
    budgets: Sequence[Budget] | UnsetType = UNSET,
    rate_limit: RateLimit | UnsetType | None = UNSET,
) -> None:
    """Fold an event carrying the owner's whole budget set and/or rate limit into
    its ledger (`service.domain.ledger`), and store the definitions it yields with
    their anchors and floors; the clock, pending usage and what the clock's move
    filed are written with the batch (`Books.flush`). A created owner's is
    `governance._create`'s."""
    entry = (await books.take(conn, [owner])).get(owner)
    if entry is None:  # a provider config new in this event
        await create_ledger(conn, owner, at)
        entry = books.open(owner, open_ledger(at, history=True))
    ledger = entry.ledger
    upsert: tuple[object, ...] = ()
    if not isinstance(budgets, UnsetType):
        define_budgets(ledger, budgets, at)
        meters = ledger.budgets
        await conn.execute(_DELETE_DROPPED_BUDGETS, *owner, [m.id for m in meters])
        if meters:
            upsert = _budget_rows(owner, ledger, version, at)
    if not isinstance(rate_limit, UnsetType):
        changes = define_rate_limit(ledger, rate_limit, at)
        dropped = [k for k, t in changes.items() if t is Transition.DROPPED]
        if dropped and rate_limit is not None and entry.rate_limit_id is not None:
            # The ledger forgot the half's cells; the rows written before go too
            # (without the row's halves, its delete takes them all).
            await conn.execute(_DROP_HALVES, entry.rate_limit_id, dropped)
        if upsert and rate_limit is not None:
            # One round trip for both (a created key: the common case).
            found = await conn.fetchval(
                _UPSERT_BUDGETS_AND_RATE_LIMIT, *upsert, *halves(ledger)
            )
            if found is not None:
                entry.rate_limit_id = int(found)
            return
        entry.rate_limit_id = await _write_rate_limit(
            conn, owner, ledger, rate_limit, version, at, entry.rate_limit_id
        )
    if upsert:
        await conn.execute(_UPSERT_BUDGETS, *upsert)


_DELETE_DROPPED_BUDGETS = """
DELETE FROM governance_budgets
WHERE owner_type = $1 AND owner_id = $2 AND id <> ALL($3::text[])
"""
# A budget's rows: the columns, then (after their SELECT) the upsert. Shared with
# governance.py's grouped insert of new owners.
INSERT_BUDGETS = """
INSERT INTO governance_budgets AS b (id, customer_id, team_id, virtual_key_id,
    provider_config_id, version, created_at, updated_at, max_limit, reset_duration,
    calendar_aligned, anchor, usage_floor, ordinal)
"""
BUDGET_CONFLICT = """
ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at, max_limit = EXCLUDED.max_limit,
    reset_duration = EXCLUDED.reset_duration,
    calendar_aligned = EXCLUDED.calendar_aligned, anchor = EXCLUDED.anchor,
    usage_floor = EXCLUDED.usage_floor, ordinal = EXCLUDED.ordinal
WHERE b.version < EXCLUDED.version
"""
_OWNER_BUDGETS = """
SELECT u.id, $1, $2, $3, $4, $5, $6, $6, u.max_limit, u.reset_duration,
    u.calendar_aligned, u.anchor, u.usage_floor, u.ordinal
FROM unnest($7::text[], $8::numeric[], $9::text[], $10::boolean[],
            $11::timestamptz[], $12::timestamptz[])
     WITH ORDINALITY AS u(id, max_limit, reset_duration, calendar_aligned, anchor,
                          usage_floor, ordinal)
"""
_UPSERT_BUDGETS = INSERT_BUDGETS + _OWNER_BUDGETS + BUDGET_CONFLICT


def _budget_rows(
    owner: Owner, ledger: Ledger, version: int, at: datetime
) -> tuple[object, ...]:
    """The arguments of _UPSERT_BUDGETS: the ledger's budgets, in its order."""
    meters = ledger.budgets
    return (
        *owner.columns,
        version,
        at,
        [m.id for m in meters],
        [to_money(m.limit) for m in meters],
        [m.reset_duration for m in meters],
        [m.calendar_aligned for m in meters],
        [m.anchor for m in meters],
        [m.floor for m in meters],
    )


_DROP_HALVES = """
DELETE FROM governance_rate_limit_usage
WHERE rate_limit_id = $1 AND kind = ANY($2::text[])
"""
_DELETE_RATE_LIMIT = (
    "DELETE FROM governance_rate_limits WHERE owner_type = $1 AND owner_id = $2"
)
# A rate limit's row: the columns, then (after its VALUES or SELECT) the upsert,
# then what it returns. Shared with governance.py's grouped insert of new owners.
INSERT_RATE_LIMIT = """
INSERT INTO governance_rate_limits AS r (customer_id, team_id, virtual_key_id,
    provider_config_id, version, created_at, updated_at,
    token_max_limit, token_reset_duration, token_anchor, token_usage_floor,
    request_max_limit, request_reset_duration, request_anchor, request_usage_floor)
"""
RATE_LIMIT_CONFLICT = """
ON CONFLICT (owner_type, owner_id) DO UPDATE SET version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at,
    token_max_limit = EXCLUDED.token_max_limit,
    token_reset_duration = EXCLUDED.token_reset_duration,
    token_anchor = EXCLUDED.token_anchor,
    token_usage_floor = EXCLUDED.token_usage_floor,
    request_max_limit = EXCLUDED.request_max_limit,
    request_reset_duration = EXCLUDED.request_reset_duration,
    request_anchor = EXCLUDED.request_anchor,
    request_usage_floor = EXCLUDED.request_usage_floor
WHERE r.version < EXCLUDED.version
"""
_UPSERT_RATE_LIMIT = (
    INSERT_RATE_LIMIT
    + "VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    + RATE_LIMIT_CONFLICT
    + "RETURNING id"
)


async def _write_rate_limit(
    conn: Connection,
    owner: Owner,
    ledger: Ledger,
    rate_limit: RateLimit | None,
    version: int,
    at: datetime,
    current_id: int | None,
) -> int | None:
    """The owner's rate-limit row becomes the ledger's halves (none: no row); its
    id, which keys the halves' cells."""
    if rate_limit is None:
        if current_id is not None:
            await conn.execute(_DELETE_RATE_LIMIT, *owner)
        return None
    found = await conn.fetchval(
        _UPSERT_RATE_LIMIT, *owner.columns, version, at, *halves(ledger)
    )
    return current_id if found is None else int(found)


def halves(ledger: Ledger) -> list[object]:
    """The rate limit's columns from `token_max_limit` on (None: a half not set)."""
    halves: list[object] = []
    for half in (ledger.tokens, ledger.requests):
        if half is None:
            halves += [None, None, None, None]
        else:
            halves += [half.limit, half.reset_duration, half.anchor, half.floor]
    return halves


# _UPSERT_BUDGETS ($1-$12), then _UPSERT_RATE_LIMIT with its halves at $13-$20.
_UPSERT_BUDGETS_AND_RATE_LIMIT = (
    "WITH budgets AS ("
    + _UPSERT_BUDGETS
    + ")"
    + INSERT_RATE_LIMIT
    + "VALUES ($1, $2, $3, $4, $5, $6, $6, $13, $14, $15, $16, $17, $18, $19, $20)"
    + RATE_LIMIT_CONFLICT
    + "RETURNING id"
)
