"""The read model's holds (reservations): written from ReservationHeld, dropped by a
settling usage record, a release or the key's deletion; read as `held` beside each
budget's and rate limit's usage (`projections.governance_readings`). Expiry is
computed when read: a hold counts while its `expires_at` is after the moment read
at."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from projections.governance_usage import Charged
from service.domain.events import ReservationHeld
from service.domain.ledger import to_money, to_nanos
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
        # As the ledger counts it (in nanos): whatever digits the log spells it
        # with (a legacy or imported 0E-16384), numeric can store it.
        to_money(to_nanos(event.amount)),
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
