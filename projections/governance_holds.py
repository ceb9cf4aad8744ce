"""The read model's holds (reservations): written from ReservationHeld, dropped by a
settling usage record, a release or the key's deletion; read as `held` beside each
budget's and rate limit's usage. Expiry is computed when read: a hold counts while
its `expires_at` is after the moment read at."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from projections.governance_usage import Charged
from service.domain.events import ReservationHeld
from service.eventstore import Connection, Queryable

_INSERT = """
INSERT INTO governance_holds (reservation_id, virtual_key_id, provider_config_id,
    team_id, customer_id, budget_ids, rate_owner_ids, amount, tokens, expires_at,
    position)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (reservation_id) DO NOTHING
"""
_RELEASE = """
DELETE FROM governance_holds WHERE reservation_id = $1 AND virtual_key_id = $2
"""
_SETTLE = """
DELETE FROM governance_holds h
USING unnest($1::text[], $2::text[]) AS s (reservation_id, virtual_key_id)
WHERE h.reservation_id = s.reservation_id AND h.virtual_key_id = s.virtual_key_id
"""
_DROP_KEY = "DELETE FROM governance_holds WHERE virtual_key_id = $1"
# What open holds keep of each budget, and of each rate-limit owner (tokens and
# requests), in one round trip.
_HELD = """
SELECT
    ARRAY(
        SELECT ROW(b.budget_id, sum(h.amount))
        FROM governance_holds h, unnest(h.budget_ids) AS b (budget_id)
        WHERE b.budget_id = ANY($1::text[]) AND h.expires_at > $3
        GROUP BY b.budget_id
    ) AS budgets,
    ARRAY(
        SELECT ROW(o.owner_id, sum(h.tokens), count(*))
        FROM governance_holds h, unnest(h.rate_owner_ids) AS o (owner_id)
        WHERE o.owner_id = ANY($2::text[]) AND h.expires_at > $3
        GROUP BY o.owner_id
    ) AS rate_owners
"""
_OPEN = """
SELECT reservation_id, virtual_key_id, provider_config_id, team_id, customer_id,
    budget_ids, rate_owner_ids, amount, tokens, expires_at
FROM governance_holds WHERE expires_at > $1 ORDER BY position
"""


async def hold(conn: Connection, event: ReservationHeld, position: int) -> None:
    await conn.execute(
        _INSERT,
        event.reservation_id,
        event.virtual_key_id,
        event.provider_config_id,
        event.team_id,
        event.customer_id,
        list(event.budget_ids),
        list(event.rate_owner_ids),
        event.amount,
        event.tokens,
        event.expires_at,
        position,
    )


async def release(conn: Connection, reservation_id: str, virtual_key_id: str) -> None:
    await conn.execute(_RELEASE, reservation_id, virtual_key_id)


async def settle(conn: Connection, usage: Sequence[Charged]) -> None:
    """Drop the holds these records name (a hold of another key is not theirs)."""
    named = [u for u in usage if u.reservation_id is not None]
    if named:
        await conn.execute(
            _SETTLE,
            [u.reservation_id for u in named],
            [u.virtual_key_id for u in named],
        )


async def drop_key(conn: Connection, virtual_key_id: str) -> None:
    await conn.execute(_DROP_KEY, virtual_key_id)


class Held(NamedTuple):
    """What open holds keep: by budget id, and by rate-limit owner id (tokens,
    requests)."""

    budgets: dict[str, Decimal]
    rate_owners: dict[str, tuple[int, int]]


async def held(
    conn: Queryable,
    budget_ids: Sequence[str],
    rate_owner_ids: Sequence[str],
    now: datetime,
) -> Held:
    if not budget_ids and not rate_owner_ids:
        return Held({}, {})
    row = await conn.fetchrow(_HELD, list(budget_ids), list(rate_owner_ids), now)
    assert row is not None
    return Held(
        {budget_id: amount for budget_id, amount in row["budgets"]},
        {
            owner_id: (int(tokens), int(requests))
            for owner_id, tokens, requests in row["rate_owners"]
        },
    )


async def open_holds(conn: Queryable, now: datetime) -> list[ReservationHeld]:
    """Every hold still open at `now`, as its event (to restore the cache)."""
    return [
        ReservationHeld(
            reservation_id=r["reservation_id"],
            virtual_key_id=r["virtual_key_id"],
            provider_config_id=r["provider_config_id"],
            team_id=r["team_id"],
            customer_id=r["customer_id"],
            budget_ids=tuple(r["budget_ids"]),
            rate_owner_ids=tuple(r["rate_owner_ids"]),
            amount=r["amount"],
            tokens=r["tokens"],
            expires_at=r["expires_at"],
        )
        for r in await conn.fetch(_OPEN, now)
    ]
