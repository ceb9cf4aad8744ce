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

from service.domain.budgets import (
    Duration,
    counts_toward,
    parse_duration,
    period_bounds,
)
from service.domain.events import UsageRecorded
from service.eventstore import Connection
from service.records import RecordedEvent

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
# Marks the streams charged up to (tx_id, position) and adds the spend and rate-limit
# usage, in one statement (one round trip); each array lists distinct keys.
_CHARGE = """
WITH marked AS (
    INSERT INTO governance_usage_streams AS g (stream_id, last_tx_id, last_position)
    SELECT * FROM unnest($1::text[], $2::xid8[], $3::bigint[])
    ON CONFLICT (stream_id) DO UPDATE
    SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position
), spent AS (
    INSERT INTO governance_budget_spend AS s (budget_id, period_start, spend)
    SELECT * FROM unnest($4::text[], $5::timestamptz[], $6::numeric[])
    ON CONFLICT (budget_id, period_start)
    DO UPDATE SET spend = s.spend + EXCLUDED.spend
)
INSERT INTO governance_rate_limit_usage AS u (rate_limit_id, kind, period_start, used)
SELECT * FROM unnest($7::bigint[], $8::text[], $9::timestamptz[], $10::bigint[])
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


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)

# A budget as charging needs it: (id, anchor, duration, calendar_aligned, floor).
_BudgetTerms = tuple[str, datetime, Duration, bool, datetime]
# A rate-limit half: (rate limit id, kind, anchor, duration, floor).
_RateTerms = tuple[int, str, datetime, Duration, datetime]
# Where a moment's usage of an owner goes: (budget id, key) and (id, kind, key).
_Slots = tuple[tuple[tuple[str, datetime], ...], tuple[tuple[int, str, datetime], ...]]


class _Sum:
    """Usage folded for one owner's slots: totals, and whether any part was non-zero
    (a zero amount writes no row, as if charged event by event)."""

    __slots__ = ("cost", "costed", "requested", "requests", "tokened", "tokens")

    def __init__(self) -> None:
        self.cost = Decimal(0)
        self.tokens = 0
        self.requests = 0
        self.costed = self.tokened = self.requested = False

    def add(self, other: _Sum) -> None:
        if other.costed:
            self.cost += other.cost
            self.costed = True
        if other.tokened:
            self.tokens += other.tokens
            self.tokened = True
        if other.requested:
            self.requests += other.requests
            self.requested = True


class _Limits:
    """One owner's budgets and rate-limit halves, and the usage of a batch folded per
    slots (the keys usage at a moment is stored under).

    It remembers the span of time around the last moment charged in which every
    slot stays the same: consecutive usage nearly always falls in it, so the period
    maths runs once per owner and period rather than once per event and budget.
    """

    __slots__ = ("budgets", "current", "hi", "lo", "rates", "sums")

    def __init__(self, budgets: list[_BudgetTerms], rates: list[_RateTerms]) -> None:
        self.budgets = budgets
        self.rates = rates
        self.sums: dict[_Slots, _Sum] = {}
        self.lo = _LATEST  # an empty span: the first moment computes one
        self.hi = _EARLIEST
        self.current = _Sum()

    def sum_at(self, at: datetime) -> _Sum:
        """The running total that usage at `at` adds to."""
        if self.lo <= at < self.hi:
            return self.current
        lo, hi = _EARLIEST, _LATEST
        spend: list[tuple[str, datetime]] = []
        for budget_id, anchor, duration, aligned, floor in self.budgets:
            if not counts_toward(at, usage_floor=floor):
                hi = min(hi, floor)
                continue
            start, end = period_bounds(
                at, anchor=anchor, duration=duration, calendar_aligned=aligned
            )
            key = max(start, floor)
            spend.append((budget_id, key))
            lo, hi = max(lo, key), min(hi, end)
        used: list[tuple[int, str, datetime]] = []
        for limit_id, kind, anchor, duration, floor in self.rates:
            if not counts_toward(at, usage_floor=floor):
                hi = min(hi, floor)
                continue
            start, end = period_bounds(
                at, anchor=anchor, duration=duration, calendar_aligned=False
            )
            key = max(start, floor)
            used.append((limit_id, kind, key))
            lo, hi = max(lo, key), min(hi, end)
        slots = (tuple(spend), tuple(used))
        total = self.sums.get(slots)
        if total is None:
            total = self.sums[slots] = _Sum()
        self.lo, self.hi, self.current = lo, hi, total
        return total


class _Chain:
    """The limits of the owners one chain names, and its usage folded per the
    owners' running totals it adds to: per event one comparison while the moments
    stay in the span where none of those totals changes."""

    __slots__ = ("current", "hi", "lo", "owners", "sums")

    def __init__(self, owners: list[_Limits]) -> None:
        self.owners = owners
        self.sums: dict[tuple[_Sum, ...], _Sum] = {}
        self.lo = _LATEST
        self.hi = _EARLIEST
        self.current = _Sum()

    def sum_at(self, at: datetime) -> _Sum:
        if self.lo <= at < self.hi:
            return self.current
        lo, hi = _EARLIEST, _LATEST
        targets: list[_Sum] = []
        for owner in self.owners:
            targets.append(owner.sum_at(at))
            lo, hi = max(lo, owner.lo), min(hi, owner.hi)
        key = tuple(targets)  # a _Sum hashes by identity
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = _Sum()
        self.lo, self.hi, self.current = lo, hi, total
        return total

    def settle(self) -> None:
        """Add what was folded here to the owners' totals."""
        for targets, total in self.sums.items():
            for target in targets:
                target.add(total)


async def _limits_of(conn: Connection, owners: Sequence[Owner]) -> dict[Owner, _Limits]:
    """The budgets and rate limits of `owners` (two queries), by owner."""
    durations: dict[str, Duration] = {}

    def duration(text: str) -> Duration:
        parsed = durations.get(text)
        if parsed is None:
            parsed = durations[text] = parse_duration(text)
        return parsed

    budgets: defaultdict[Owner, list[_BudgetTerms]] = defaultdict(list)
    for row in await budgets_of(conn, owners):
        budgets[Owner(row["owner_type"], row["owner_id"])].append(
            (
                row["id"],
                row["anchor"],
                duration(row["reset_duration"]),
                row["calendar_aligned"],
                row["usage_floor"],
            )
        )
    rates: defaultdict[Owner, list[_RateTerms]] = defaultdict(list)
    for row in await rate_limits_of(conn, owners):
        for kind in RATE_KINDS:
            prefix = kind[:-1]
            floor = row[f"{prefix}_usage_floor"]
            if floor is not None:  # the half is set
                rates[Owner(row["owner_type"], row["owner_id"])].append(
                    (
                        row["id"],
                        kind,
                        row[f"{prefix}_anchor"],
                        duration(row[f"{prefix}_reset_duration"]),
                        floor,
                    )
                )
    return {
        owner: _Limits(budgets.get(owner, []), rates.get(owner, []))
        for owner in budgets.keys() | rates.keys()
    }


async def charge(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> None:
    """Add a run of usage to the budgets and rate limits of the owners it names.

    Folded in memory per chain and period, then per (budget, period) and (rate
    limit, kind, period), and written with one statement (with the usage streams'
    guard).
    """
    # Reads first, then one write: the transaction takes its xid (and holds back
    # every tailer's horizon, the cache's included) only for that last statement.
    usage, last = await _not_yet_charged(conn, usage)
    if not usage:
        return
    chains: dict[tuple[str | None, ...], list[Owner]] = {}
    for _, event in usage:
        names = (
            event.virtual_key_id,
            event.provider_config_id,
            event.team_id,
            event.customer_id,
        )
        if names not in chains:
            chains[names] = _chain(event)
    owners = sorted({owner for chain in chains.values() for owner in chain})
    limits = await _limits_of(conn, owners)
    # Each chain with the limits of its owners that have any.
    charged = {
        names: _Chain([limits[o] for o in chain if o in limits])
        for names, chain in chains.items()
    }
    for _, event in usage:
        at = event.occurred_at
        if at.tzinfo is None:  # a hand-made import; API.md's timestamps are UTC
            at = at.replace(tzinfo=UTC)
        total = charged[
            event.virtual_key_id,
            event.provider_config_id,
            event.team_id,
            event.customer_id,
        ].sum_at(at)
        if event.cost:
            total.cost += event.cost
            total.costed = True
        tokens = event.input_tokens + event.output_tokens
        if tokens:
            total.tokens += tokens
            total.tokened = True
        if event.requests:
            total.requests += event.requests
            total.requested = True
    for chain in charged.values():
        chain.settle()
    spend: defaultdict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    used: defaultdict[tuple[int, str, datetime], int] = defaultdict(int)
    for owner in limits.values():
        for (budget_slots, rate_slots), total in owner.sums.items():
            if total.costed:
                for slot in budget_slots:
                    spend[slot] += total.cost
            for limit_id, kind, period in rate_slots:
                if kind == "tokens" and total.tokened:
                    used[limit_id, kind, period] += total.tokens
                elif kind == "requests" and total.requested:
                    used[limit_id, kind, period] += total.requests
    keys = sorted(spend)
    slots = sorted(used)
    await conn.execute(
        _CHARGE,
        list(last),
        [tx for tx, _ in last.values()],
        [position for _, position in last.values()],
        [k[0] for k in keys],
        [k[1] for k in keys],
        [spend[k] for k in keys],
        [s[0] for s in slots],
        [s[1] for s in slots],
        [s[2] for s in slots],
        [used[s] for s in slots],
    )


def _columns_of(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of equal length as one list per column (for unnest)."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _not_yet_charged(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> tuple[list[tuple[RecordedEvent, UsageRecorded]], dict[str, tuple[int, int]]]:
    """The usage not charged before (the version guard of usage streams), and the
    (tx_id, position) each of its streams is charged up to with it. Positions of one
    stream arrive in (tx_id, position) order."""
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
    return fresh, dict(sorted(last.items()))


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
