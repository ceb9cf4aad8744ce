"""Usage in the governance read model: the owners of budgets and rate limits, the
period key their usage is stored at, and every statement on the usage tables
(governance_budget_spend, governance_rate_limit_usage, governance_usage_streams).

Usage is stored per budget (and per rate-limit half) per *effective* period: the key
is the later of the period's start and the usage floor, so an explicit reset opens a
fresh row at the reset instant and the current usage shows 0 at once, while the
spend before it stays on record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.domain.budgets import counts_toward, parse_duration, period_bounds
from service.domain.events import UsageRecorded
from service.eventstore import RecordedEvent

Connection = asyncpg.Connection | PoolConnectionProxy
OWNER_TYPES = ("customer", "team", "virtual_key", "provider_config")
RATE_KINDS = ("tokens", "requests")  # a rate limit's halves; columns `token_…` etc.


class Owner(NamedTuple):
    type: str
    id: str

    @property
    def columns(self) -> tuple[str | None, ...]:
        """(customer_id, team_id, virtual_key_id, provider_config_id), one set."""
        return tuple(self.id if self.type == t else None for t in OWNER_TYPES)


def periods(
    at: datetime,
    *,
    anchor: datetime,
    duration: str,
    calendar_aligned: bool,
    floor: datetime,
) -> tuple[datetime, datetime]:
    """The start of the period containing `at`, and the key its usage is stored at."""
    start, _end = period_bounds(
        at,
        anchor=anchor,
        duration=parse_duration(duration),
        calendar_aligned=calendar_aligned,
    )
    return start, max(start, floor)


def budget_period(budget: asyncpg.Record, at: datetime) -> tuple[datetime, datetime]:
    """`periods` of a governance_budgets row."""
    return periods(
        at,
        anchor=budget["anchor"],
        duration=budget["reset_duration"],
        calendar_aligned=budget["calendar_aligned"],
        floor=budget["usage_floor"],
    )


def rate_key(limit: asyncpg.Record, kind: str, at: datetime) -> datetime | None:
    """The key a governance_rate_limits row's half stores usage at `at` under; None
    when that half is not set. Rate-limit periods roll from their anchor."""
    prefix = kind[:-1]
    floor = limit[f"{prefix}_usage_floor"]
    if floor is None:
        return None
    return periods(
        at,
        anchor=limit[f"{prefix}_anchor"],
        duration=limit[f"{prefix}_reset_duration"],
        calendar_aligned=False,
        floor=floor,
    )[1]


# --- the limits of a set of owners -------------------------------------------------

_BUDGETS_OF = """
SELECT b.id, owner_type, owner_id, b.max_limit, b.reset_duration, b.calendar_aligned,
    b.anchor, b.usage_floor
FROM governance_budgets b
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
ORDER BY b.ordinal
"""
_RATE_LIMITS_OF = """
SELECT r.id, owner_type, owner_id, r.token_max_limit, r.token_reset_duration,
    r.token_anchor, r.token_usage_floor, r.request_max_limit,
    r.request_reset_duration, r.request_anchor, r.request_usage_floor
FROM governance_rate_limits r
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
"""


async def budgets_of(conn: Connection, owners: Sequence[Owner]) -> list[asyncpg.Record]:
    """The budgets of `owners`, each owner's in its listed order."""
    return await conn.fetch(_BUDGETS_OF, *_columns(owners))


async def rate_limits_of(
    conn: Connection, owners: Sequence[Owner]
) -> list[asyncpg.Record]:
    return await conn.fetch(_RATE_LIMITS_OF, *_columns(owners))


def _columns(owners: Sequence[Owner]) -> tuple[list[str], list[str]]:
    return [o.type for o in owners], [o.id for o in owners]


# --- charging usage ----------------------------------------------------------------

_CHARGED_UP_TO = """
SELECT stream_id, last_tx_id, last_position FROM governance_usage_streams
WHERE stream_id = ANY($1::text[])
"""
_MARK_CHARGED = """
INSERT INTO governance_usage_streams AS g (stream_id, last_tx_id, last_position)
SELECT * FROM unnest($1::text[], $2::xid8[], $3::bigint[])
ON CONFLICT (stream_id) DO UPDATE
SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position
"""
_ADD_SPEND = """
INSERT INTO governance_budget_spend AS s (budget_id, period_start, spend)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::numeric[])
ON CONFLICT (budget_id, period_start) DO UPDATE SET spend = s.spend + EXCLUDED.spend
"""
_ADD_RATE_USAGE = """
INSERT INTO governance_rate_limit_usage AS u (rate_limit_id, kind, period_start, used)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::bigint[])
ON CONFLICT (rate_limit_id, kind, period_start)
DO UPDATE SET used = u.used + EXCLUDED.used
"""


def _chain(event: UsageRecorded) -> list[Owner]:
    """The owners the event names: its key, provider config, team and customer."""
    owners = [Owner("virtual_key", event.virtual_key_id)]
    if event.provider_config_id is not None:
        owners.append(Owner("provider_config", event.provider_config_id))
    if event.team_id is not None:
        owners.append(Owner("team", event.team_id))
    if event.customer_id is not None:
        owners.append(Owner("customer", event.customer_id))
    return owners


async def charge(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> None:
    """Add a run of usage to the budgets and rate limits of the owners it names.

    Folded in memory per (budget, period) and written with one statement per table.
    """
    usage = await _not_yet_charged(conn, usage)
    if not usage:
        return
    owners = sorted({owner for _, event in usage for owner in _chain(event)})
    budgets: defaultdict[Owner, list[asyncpg.Record]] = defaultdict(list)
    for row in await budgets_of(conn, owners):
        budgets[Owner(row["owner_type"], row["owner_id"])].append(row)
    limits = {
        Owner(row["owner_type"], row["owner_id"]): row
        for row in await rate_limits_of(conn, owners)
    }
    spend: defaultdict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    used: defaultdict[tuple[int, str, datetime], int] = defaultdict(int)
    for _, event in usage:
        at = event.occurred_at
        if at.tzinfo is None:  # a hand-made import; API.md's timestamps are UTC
            at = at.replace(tzinfo=UTC)
        for owner in _chain(event):
            for budget in budgets.get(owner, ()):
                if event.cost and counts_toward(at, usage_floor=budget["usage_floor"]):
                    spend[budget["id"], budget_period(budget, at)[1]] += event.cost
            limit = limits.get(owner)
            if limit is None:
                continue
            amounts = (event.input_tokens + event.output_tokens, event.requests)
            for kind, amount in zip(RATE_KINDS, amounts, strict=True):
                floor = limit[f"{kind[:-1]}_usage_floor"]
                if (
                    amount
                    and floor is not None
                    and counts_toward(at, usage_floor=floor)
                ):
                    key = rate_key(limit, kind, at)
                    assert key is not None  # the half is set: it has a floor
                    used[limit["id"], kind, key] += amount
    if spend:
        keys = sorted(spend)
        await conn.execute(_ADD_SPEND, *_columns_of(keys), [spend[k] for k in keys])
    if used:
        slots = sorted(used)
        await conn.execute(
            _ADD_RATE_USAGE, *_columns_of(slots), [used[s] for s in slots]
        )


def _columns_of(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of equal length as one list per column (for unnest)."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _not_yet_charged(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> list[tuple[RecordedEvent, UsageRecorded]]:
    """The usage not charged before (the version guard of usage streams), and mark
    it charged. Positions of one stream arrive in (tx_id, position) order."""
    streams = sorted({record.stream_id for record, _ in usage})
    seen = {
        row["stream_id"]: (int(row["last_tx_id"]), row["last_position"])
        for row in await conn.fetch(_CHARGED_UP_TO, streams)
    }
    fresh = [
        (record, event)
        for record, event in usage
        if (record.tx_id, record.global_position) > seen.get(record.stream_id, (0, 0))
    ]
    last: dict[str, tuple[int, int]] = {}
    for record, _ in fresh:
        last[record.stream_id] = (record.tx_id, record.global_position)
    if last:
        await conn.execute(
            _MARK_CHARGED,
            list(last),
            [tx for tx, _ in last.values()],
            [position for _, position in last.values()],
        )
    return fresh


# --- when a limit's shape changes --------------------------------------------------

# Moves a period's spend to another key, adding to what is there.
_MOVE_SPEND = """
WITH moved AS (
    DELETE FROM governance_budget_spend WHERE budget_id = $1 AND period_start = $2
    RETURNING spend
)
INSERT INTO governance_budget_spend AS s (budget_id, period_start, spend)
SELECT $1, $3, spend FROM moved
ON CONFLICT (budget_id, period_start) DO UPDATE SET spend = s.spend + EXCLUDED.spend
"""
_FORGET_RATE_USAGE = """
DELETE FROM governance_rate_limit_usage WHERE rate_limit_id = $1 AND kind = $2
"""


async def move_spend(
    conn: Connection, budget_id: str, key: datetime, to: datetime
) -> None:
    """The budget's spend stored at `key` is stored at `to` instead."""
    await conn.execute(_MOVE_SPEND, budget_id, key, to)


async def forget_rate_usage(conn: Connection, rate_limit_id: int, kind: str) -> None:
    """A rate-limit half anchored anew starts from no usage."""
    await conn.execute(_FORGET_RATE_USAGE, rate_limit_id, kind)


# --- reading -----------------------------------------------------------------------

_SPEND = """
SELECT s.budget_id, s.period_start, s.spend FROM governance_budget_spend s
JOIN unnest($1::text[], $2::timestamptz[]) AS k(budget_id, period_start)
    USING (budget_id, period_start)
"""
_RATE_USAGE = """
SELECT u.rate_limit_id, u.kind, u.period_start, u.used
FROM governance_rate_limit_usage u
JOIN unnest($1::bigint[], $2::text[], $3::timestamptz[])
    AS k(rate_limit_id, kind, period_start) USING (rate_limit_id, kind, period_start)
"""


async def spend_at(
    conn: Connection, keys: Iterable[tuple[str, datetime]]
) -> dict[tuple[str, datetime], Decimal]:
    """The spend stored at each (budget id, period key); absent keys: none."""
    return await _stored(conn, _SPEND, keys)


async def rate_usage_at(
    conn: Connection, slots: Iterable[tuple[int, str, datetime]]
) -> dict[tuple[int, str, datetime], int]:
    """The usage stored at each (rate limit id, kind, period key); absent: none."""
    return await _stored(conn, _RATE_USAGE, slots)


async def _stored(
    conn: Connection, sql: str, keys: Iterable[tuple[Any, ...]]
) -> dict[Any, Any]:
    keys = list(keys)
    if not keys:
        return {}
    rows = await conn.fetch(sql, *_columns_of(keys))
    return {tuple(r)[:-1]: tuple(r)[-1] for r in rows}
