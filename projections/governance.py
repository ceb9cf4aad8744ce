"""The governance read model: `apply` folds events into the governance_* tables, and
the read queries build API.md's wire dicts (customers, teams, keys, budgets) from them.

Usage is stored per budget (and per rate limit) per *effective* period: the key is the
later of the period's start and the usage floor, so an explicit reset opens a fresh
row at the reset instant and the current usage shows 0 at once, while the spend
before it stays on record. `last_reset` on the wire is the start of the period that
contains `now` (DESIGN.md), also right after a reset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple, assert_never

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.domain.budgets import counts_toward, parse_duration, period_bounds
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyDeleted,
    VirtualKeyUpdated,
)
from service.errors import NotFound
from service.eventstore import RecordedEvent

Connection = asyncpg.Connection | PoolConnectionProxy
Wire = dict[str, Any]
OWNER_TYPES = ("customer", "team", "virtual_key", "provider_config")


class Owner(NamedTuple):
    type: str
    id: str

    @property
    def columns(self) -> tuple[str | None, ...]:
        """(customer_id, team_id, virtual_key_id, provider_config_id), one set."""
        return tuple(self.id if self.type == t else None for t in OWNER_TYPES)


def _periods(
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


# --- apply -------------------------------------------------------------------------


async def apply(conn: Connection, records: Sequence[RecordedEvent]) -> None:
    """Fold a batch into the tables; the caller owns the transaction.

    Runs of UsageRecorded are charged together; every other event is applied on its
    own, in log order, so usage is charged against the budgets as they stood.
    """
    usage: list[tuple[RecordedEvent, UsageRecorded]] = []
    for record in records:
        if isinstance(record.event, UsageRecorded):
            usage.append((record, record.event))
            continue
        if usage:
            await _charge(conn, usage)
            usage = []
        await _apply_event(conn, record)
    if usage:
        await _charge(conn, usage)


async def _apply_event(conn: Connection, record: RecordedEvent) -> None:
    e, v, at = record.event, record.stream_version, record.recorded_at
    match e:
        case CustomerCreated():
            if await _wrote(conn, _INSERT_CUSTOMER, e.customer_id, v, at, e.name):
                owner = Owner("customer", e.customer_id)
                await _replace_budgets(conn, owner, e.budgets, v, at)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at)
        case CustomerUpdated():
            if await _wrote(conn, _UPDATE_CUSTOMER, e.customer_id, v, at, e.name):
                owner = Owner("customer", e.customer_id)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at)
        case CustomerBudgetsReplaced():
            if await _wrote(conn, _TOUCH["customer"], e.customer_id, v, at):
                owner = Owner("customer", e.customer_id)
                await _replace_budgets(conn, owner, e.budgets, v, at)
        case CustomerDeleted():
            await conn.execute(_DELETE_CUSTOMER, e.customer_id, v)
        case TeamCreated():
            if await _wrote(conn, _INSERT_TEAM, *_team_row(e, v, at)):
                owner = Owner("team", e.team_id)
                await _replace_budgets(conn, owner, e.budgets, v, at)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at)
        case TeamUpdated():
            if await _wrote(conn, _UPDATE_TEAM, *_team_row(e, v, at)):
                owner = Owner("team", e.team_id)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at)
        case TeamBudgetsReplaced():
            if await _wrote(conn, _TOUCH["team"], e.team_id, v, at):
                await _replace_budgets(conn, Owner("team", e.team_id), e.budgets, v, at)
        case TeamDeleted():
            await conn.execute(_DELETE_TEAM, e.team_id, v)
        case VirtualKeyCreated():
            if await _wrote(conn, _INSERT_VIRTUAL_KEY, *_key_row(e, v, at)):
                owner = Owner("virtual_key", e.virtual_key_id)
                await _replace_budgets(conn, owner, e.budgets, v, at)
                await _set_key_settings(conn, owner, e, v, at)
        case VirtualKeyUpdated():
            if await _wrote(conn, _UPDATE_VIRTUAL_KEY, *_key_row(e, v, at)):
                owner = Owner("virtual_key", e.virtual_key_id)
                await _set_key_settings(conn, owner, e, v, at)
        case VirtualKeyBudgetsReplaced():
            if await _wrote(conn, _TOUCH["virtual_key"], e.virtual_key_id, v, at):
                owner = Owner("virtual_key", e.virtual_key_id)
                await _replace_budgets(conn, owner, e.budgets, v, at)
        case VirtualKeyDeleted():
            # Cascades to its budgets, rate limit, provider configs and theirs.
            await conn.execute(_DELETE_VIRTUAL_KEY, e.virtual_key_id, v)
        case UsageRecorded():
            raise AssertionError("usage is charged in runs by _charge")
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
    owner: Owner,
    e: VirtualKeyCreated | VirtualKeyUpdated,
    version: int,
    at: datetime,
) -> None:
    await _set_rate_limit(conn, owner, e.rate_limit, version, at)
    await _replace_provider_configs(conn, owner.id, e.provider_configs, version, at)


# $1 id, $2 stream version, $3 recorded_at, then the fields. A created row is inserted
# once; an update applies only to an older row (the version guard).
_INSERT_CUSTOMER = """
INSERT INTO governance_customers (id, version, created_at, updated_at, name)
VALUES ($1, $2, $3, $3, $4)
ON CONFLICT (id) DO NOTHING
"""
_UPDATE_CUSTOMER = """
UPDATE governance_customers SET version = $2, updated_at = $3, name = $4
WHERE id = $1 AND version < $2
"""
_DELETE_CUSTOMER = "DELETE FROM governance_customers WHERE id = $1 AND version < $2"

# A parent that does not exist (any more) is stored as NULL: dangling tolerated.
_INSERT_TEAM = """
INSERT INTO governance_teams (id, version, created_at, updated_at, name, customer_id)
SELECT $1, $2, $3, $3, $4, (SELECT id FROM governance_customers WHERE id = $5)
ON CONFLICT (id) DO NOTHING
"""
_UPDATE_TEAM = """
UPDATE governance_teams SET version = $2, updated_at = $3, name = $4,
    customer_id = (SELECT id FROM governance_customers WHERE id = $5)
WHERE id = $1 AND version < $2
"""
_DELETE_TEAM = "DELETE FROM governance_teams WHERE id = $1 AND version < $2"

_INSERT_VIRTUAL_KEY = """
INSERT INTO governance_virtual_keys (id, version, created_at, updated_at, name,
    value_sha256, value_hint, team_id, customer_id, is_active)
SELECT $1, $2, $3, $3, $4, $5, $6,
    (SELECT id FROM governance_teams WHERE id = $7),
    (SELECT id FROM governance_customers WHERE id = $8), $9
ON CONFLICT (id) DO NOTHING
"""
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
    virtual_key_id: str,
    configs: Sequence[ProviderConfig],
    version: int,
    at: datetime,
) -> None:
    """The key's provider configs become exactly `configs` (kept by their id)."""
    ids = [c.provider_config_id for c in configs]
    await conn.execute(_DELETE_DROPPED_PROVIDER_CONFIGS, virtual_key_id, ids)
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
        await _replace_budgets(conn, owner, config.budgets, version, at)
        await _set_rate_limit(conn, owner, config.rate_limit, version, at)


# --- budgets -----------------------------------------------------------------------

_OWNER_BUDGETS = """
SELECT id, reset_duration, calendar_aligned, anchor, usage_floor
FROM governance_budgets WHERE owner_type = $1 AND owner_id = $2
"""
_DELETE_DROPPED_BUDGETS = """
DELETE FROM governance_budgets
WHERE owner_type = $1 AND owner_id = $2 AND id <> ALL($3::text[])
"""
_UPSERT_BUDGETS = """
INSERT INTO governance_budgets AS b (id, customer_id, team_id, virtual_key_id,
    provider_config_id, version, created_at, updated_at, max_limit, reset_duration,
    calendar_aligned, anchor, usage_floor, ordinal)
SELECT u.id, $1, $2, $3, $4, $5, $6, $6, u.max_limit, u.reset_duration,
    u.calendar_aligned, u.anchor, u.usage_floor, u.ordinal
FROM unnest($7::text[], $8::numeric[], $9::text[], $10::boolean[],
            $11::timestamptz[], $12::timestamptz[])
     WITH ORDINALITY AS u(id, max_limit, reset_duration, calendar_aligned, anchor,
                          usage_floor, ordinal)
ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at, max_limit = EXCLUDED.max_limit,
    reset_duration = EXCLUDED.reset_duration,
    calendar_aligned = EXCLUDED.calendar_aligned, anchor = EXCLUDED.anchor,
    usage_floor = EXCLUDED.usage_floor, ordinal = EXCLUDED.ordinal
WHERE b.version < EXCLUDED.version
"""
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


async def _replace_budgets(
    conn: Connection,
    owner: Owner,
    budgets: Sequence[Budget],
    version: int,
    at: datetime,
) -> None:
    """The owner's budgets become exactly `budgets`, as the event lists them.

    A new budget is anchored at `at` with its usage floor there; a kept one keeps its
    anchor, and `reset_usage` moves its floor to `at`. Turning calendar_aligned off
    keeps the current period's usage: it moves to the rolling period containing `at`.
    """
    current = {r["id"]: r for r in await conn.fetch(_OWNER_BUDGETS, *owner)}
    await conn.execute(_DELETE_DROPPED_BUDGETS, *owner, [b.budget_id for b in budgets])
    if not budgets:
        return
    anchors: list[datetime] = []
    floors: list[datetime] = []
    for budget in budgets:
        old = current.get(budget.budget_id)
        if old is None:
            anchors.append(at)
            floors.append(at)
            continue
        anchor = old["anchor"]
        floor = at if budget.reset_usage else old["usage_floor"]
        anchors.append(anchor)
        floors.append(floor)
        if old["calendar_aligned"] and not budget.calendar_aligned:
            _, was = _periods(
                at,
                anchor=anchor,
                duration=old["reset_duration"],
                calendar_aligned=True,
                floor=floor,
            )
            _, now_at = _periods(
                at,
                anchor=anchor,
                duration=budget.reset_duration,
                calendar_aligned=False,
                floor=floor,
            )
            if was != now_at:
                await conn.execute(_MOVE_SPEND, budget.budget_id, was, now_at)
    await conn.execute(
        _UPSERT_BUDGETS,
        *owner.columns,
        version,
        at,
        [b.budget_id for b in budgets],
        [b.max_limit for b in budgets],
        [b.reset_duration for b in budgets],
        [b.calendar_aligned for b in budgets],
        anchors,
        floors,
    )


# --- rate limits -------------------------------------------------------------------

_OWNER_RATE_LIMIT = """
SELECT id, token_max_limit, token_reset_duration, token_anchor,
    request_max_limit, request_reset_duration, request_anchor
FROM governance_rate_limits WHERE owner_type = $1 AND owner_id = $2
"""
_DELETE_RATE_LIMIT = (
    "DELETE FROM governance_rate_limits WHERE owner_type = $1 AND owner_id = $2"
)
_UPSERT_RATE_LIMIT = """
INSERT INTO governance_rate_limits AS r (customer_id, team_id, virtual_key_id,
    provider_config_id, version, created_at, updated_at,
    token_max_limit, token_reset_duration, token_anchor, token_usage_floor,
    request_max_limit, request_reset_duration, request_anchor, request_usage_floor)
VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $9, $10, $11, $12, $12)
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
RETURNING id
"""
_FORGET_RATE_USAGE = """
DELETE FROM governance_rate_limit_usage WHERE rate_limit_id = $1 AND kind = $2
"""


async def _set_rate_limit(
    conn: Connection,
    owner: Owner,
    rate_limit: RateLimit | None,
    version: int,
    at: datetime,
) -> None:
    """Each limit keeps its anchor unless it is new or its reset duration changed."""
    if rate_limit is None:
        await conn.execute(_DELETE_RATE_LIMIT, *owner)
        return
    old = await conn.fetchrow(_OWNER_RATE_LIMIT, *owner)
    anchors = {
        kind: _rate_anchor(old, kind, limit, duration, at)
        for kind, limit, duration in (
            ("tokens", rate_limit.token_max_limit, rate_limit.token_reset_duration),
            (
                "requests",
                rate_limit.request_max_limit,
                rate_limit.request_reset_duration,
            ),
        )
    }
    rate_limit_id = await conn.fetchval(
        _UPSERT_RATE_LIMIT,
        *owner.columns,
        version,
        at,
        rate_limit.token_max_limit,
        rate_limit.token_reset_duration,
        anchors["tokens"],
        rate_limit.request_max_limit,
        rate_limit.request_reset_duration,
        anchors["requests"],
    )
    if old is not None and rate_limit_id is not None:
        for kind, anchor in anchors.items():
            if anchor != old[f"{kind[:-1]}_anchor"]:
                await conn.execute(_FORGET_RATE_USAGE, rate_limit_id, kind)


def _rate_anchor(
    old: asyncpg.Record | None,
    kind: str,
    limit: int | None,
    duration: str | None,
    at: datetime,
) -> datetime | None:
    """A kept limit with the same reset duration keeps its anchor; else it is `at`."""
    if limit is None:
        return None
    prefix = kind[:-1]
    if (
        old is not None
        and old[f"{prefix}_max_limit"] is not None
        and old[f"{prefix}_reset_duration"] == duration
    ):
        anchor: datetime = old[f"{prefix}_anchor"]
        return anchor
    return at


# --- usage -------------------------------------------------------------------------

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
_CHAIN_BUDGETS = """
SELECT b.id, owner_type, owner_id, b.reset_duration, b.calendar_aligned, b.anchor,
    b.usage_floor
FROM governance_budgets b
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
"""
_CHAIN_RATE_LIMITS = """
SELECT r.id, owner_type, owner_id, r.token_reset_duration, r.token_anchor,
    r.token_usage_floor, r.request_reset_duration, r.request_anchor,
    r.request_usage_floor
FROM governance_rate_limits r
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
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


async def _charge(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> None:
    """Add a run of usage to the budgets and rate limits of the owners it names.

    Folded in memory per (budget, period) and written with one statement per table.
    """
    usage = await _not_yet_charged(conn, usage)
    if not usage:
        return
    owners = sorted({owner for _, event in usage for owner in _chain(event)})
    types, ids = [o.type for o in owners], [o.id for o in owners]
    budgets: defaultdict[Owner, list[asyncpg.Record]] = defaultdict(list)
    for row in await conn.fetch(_CHAIN_BUDGETS, types, ids):
        budgets[Owner(row["owner_type"], row["owner_id"])].append(row)
    limits = {
        Owner(row["owner_type"], row["owner_id"]): row
        for row in await conn.fetch(_CHAIN_RATE_LIMITS, types, ids)
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
                    _, key = _periods(
                        at,
                        anchor=budget["anchor"],
                        duration=budget["reset_duration"],
                        calendar_aligned=budget["calendar_aligned"],
                        floor=budget["usage_floor"],
                    )
                    spend[budget["id"], key] += event.cost
            limit = limits.get(owner)
            if limit is None:
                continue
            for kind, amount in (
                ("tokens", event.input_tokens + event.output_tokens),
                ("requests", event.requests),
            ):
                prefix = kind[:-1]
                floor = limit[f"{prefix}_usage_floor"]
                if (
                    amount
                    and floor is not None
                    and counts_toward(at, usage_floor=floor)
                ):
                    _, key = _periods(
                        at,
                        anchor=limit[f"{prefix}_anchor"],
                        duration=limit[f"{prefix}_reset_duration"],
                        calendar_aligned=False,
                        floor=floor,
                    )
                    used[limit["id"], kind, key] += amount
    if spend:
        keys = sorted(spend)
        await conn.execute(
            _ADD_SPEND,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [spend[k] for k in keys],
        )
    if used:
        slots = sorted(used)
        await conn.execute(
            _ADD_RATE_USAGE,
            [s[0] for s in slots],
            [s[1] for s in slots],
            [s[2] for s in slots],
            [used[s] for s in slots],
        )


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


# --- reads -------------------------------------------------------------------------

_CUSTOMERS = """
SELECT id, name, version, created_at, updated_at FROM governance_customers
WHERE $1::text IS NULL OR id = $1
ORDER BY created_at, id
"""
_TEAMS = """
SELECT id, name, customer_id, version, created_at, updated_at FROM governance_teams
WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR customer_id = $2)
ORDER BY created_at, id
"""
_VIRTUAL_KEYS = """
SELECT id, name, team_id, customer_id, is_active, value_hint, version, created_at,
    updated_at
FROM governance_virtual_keys
WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR team_id = $2)
    AND ($3::text IS NULL OR customer_id = $3)
ORDER BY created_at, id
"""
_PROVIDER_CONFIGS = """
SELECT id, virtual_key_id, provider, allowed_models FROM governance_provider_configs
WHERE virtual_key_id = ANY($1::text[])
ORDER BY virtual_key_id, ordinal
"""
_BUDGET_COLUMNS = """
SELECT b.id, owner_type, owner_id, b.max_limit, b.reset_duration, b.calendar_aligned,
    b.anchor, b.usage_floor
"""
_BUDGETS_OF = f"""{_BUDGET_COLUMNS}
FROM governance_budgets b
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
ORDER BY b.ordinal
"""
_BUDGETS = f"""{_BUDGET_COLUMNS}
FROM governance_budgets b
WHERE ($1::text IS NULL OR owner_type = $1) AND ($2::text IS NULL OR owner_id = $2)
ORDER BY b.created_at, owner_type, owner_id, b.ordinal
"""
_SPEND = """
SELECT s.budget_id, s.period_start, s.spend FROM governance_budget_spend s
JOIN unnest($1::text[], $2::timestamptz[]) AS k(budget_id, period_start)
    USING (budget_id, period_start)
"""
_RATE_LIMITS_OF = """
SELECT r.id, owner_type, owner_id, r.token_max_limit, r.token_reset_duration,
    r.token_anchor, r.token_usage_floor, r.request_max_limit,
    r.request_reset_duration, r.request_anchor, r.request_usage_floor
FROM governance_rate_limits r
JOIN unnest($1::text[], $2::text[]) AS o(owner_type, owner_id)
    USING (owner_type, owner_id)
"""
_RATE_USAGE = """
SELECT u.rate_limit_id, u.kind, u.period_start, u.used
FROM governance_rate_limit_usage u
JOIN unnest($1::bigint[], $2::text[], $3::timestamptz[])
    AS k(rate_limit_id, kind, period_start) USING (rate_limit_id, kind, period_start)
"""


async def fetch_customer(conn: Connection, customer_id: str, now: datetime) -> Wire:
    rows = await conn.fetch(_CUSTOMERS, customer_id)
    if not rows:
        raise NotFound(f"customer {customer_id} does not exist")
    return (await _customers(conn, rows, now))[0]


async def list_customers(conn: Connection, now: datetime) -> list[Wire]:
    return await _customers(conn, await conn.fetch(_CUSTOMERS, None), now)


async def fetch_team(conn: Connection, team_id: str, now: datetime) -> Wire:
    rows = await conn.fetch(_TEAMS, team_id, None)
    if not rows:
        raise NotFound(f"team {team_id} does not exist")
    return (await _teams(conn, rows, now))[0]


async def list_teams(
    conn: Connection, now: datetime, customer_id: str | None = None
) -> list[Wire]:
    return await _teams(conn, await conn.fetch(_TEAMS, None, customer_id), now)


async def fetch_virtual_key(
    conn: Connection, virtual_key_id: str, now: datetime
) -> Wire:
    rows = await conn.fetch(_VIRTUAL_KEYS, virtual_key_id, None, None)
    if not rows:
        raise NotFound(f"virtual key {virtual_key_id} does not exist")
    return (await _virtual_keys(conn, rows, now))[0]


async def list_virtual_keys(
    conn: Connection,
    now: datetime,
    team_id: str | None = None,
    customer_id: str | None = None,
) -> list[Wire]:
    rows = await conn.fetch(_VIRTUAL_KEYS, None, team_id, customer_id)
    return await _virtual_keys(conn, rows, now)


async def list_budgets(
    conn: Connection,
    now: datetime,
    owner_type: str | None = None,
    owner_id: str | None = None,
) -> list[Wire]:
    return await _budgets(conn, await conn.fetch(_BUDGETS, owner_type, owner_id), now)


async def _customers(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[Wire]:
    owners = [Owner("customer", r["id"]) for r in rows]
    budgets, rate_limits = await _owned_by(conn, owners, now)
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "budgets": budgets[o],
            "rate_limit": rate_limits.get(o),
            **_stamps(r),
        }
        for r, o in zip(rows, owners, strict=True)
    ]


async def _teams(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[Wire]:
    owners = [Owner("team", r["id"]) for r in rows]
    budgets, rate_limits = await _owned_by(conn, owners, now)
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "customer_id": r["customer_id"],
            "budgets": budgets[o],
            "rate_limit": rate_limits.get(o),
            **_stamps(r),
        }
        for r, o in zip(rows, owners, strict=True)
    ]


async def _virtual_keys(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[Wire]:
    owners = [Owner("virtual_key", r["id"]) for r in rows]
    configs = await conn.fetch(_PROVIDER_CONFIGS, [o.id for o in owners])
    config_owners = [Owner("provider_config", c["id"]) for c in configs]
    budgets, rate_limits = await _owned_by(conn, owners + config_owners, now)
    configs_of: defaultdict[str, list[Wire]] = defaultdict(list)
    for c, o in zip(configs, config_owners, strict=True):
        models = c["allowed_models"]
        configs_of[c["virtual_key_id"]].append(
            {
                "id": c["id"],
                "provider": c["provider"],
                "allowed_models": ["*"] if models is None else models,
                "budgets": budgets[o],
                "rate_limit": rate_limits.get(o),
            }
        )
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "team_id": r["team_id"],
            "customer_id": r["customer_id"],
            "is_active": r["is_active"],
            "budgets": budgets[o],
            "rate_limit": rate_limits.get(o),
            "provider_configs": configs_of[r["id"]],
            "value_hint": r["value_hint"],
            **_stamps(r),
        }
        for r, o in zip(rows, owners, strict=True)
    ]


def _stamps(row: asyncpg.Record) -> Wire:
    return {
        "version": row["version"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def _owned_by(
    conn: Connection, owners: Sequence[Owner], now: datetime
) -> tuple[defaultdict[Owner, list[Wire]], dict[Owner, Wire]]:
    """The budgets and rate limits of `owners`, with their current usage."""
    types, ids = [o.type for o in owners], [o.id for o in owners]
    budgets: defaultdict[Owner, list[Wire]] = defaultdict(list)
    for budget in await _budgets(conn, await conn.fetch(_BUDGETS_OF, types, ids), now):
        budgets[Owner(budget["owner_type"], budget["owner_id"])].append(budget)
    rows = await conn.fetch(_RATE_LIMITS_OF, types, ids)
    return budgets, await _rate_limits(conn, rows, now)


async def _budgets(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[Wire]:
    periods = [
        _periods(
            now,
            anchor=r["anchor"],
            duration=r["reset_duration"],
            calendar_aligned=r["calendar_aligned"],
            floor=r["usage_floor"],
        )
        for r in rows
    ]
    keys = [(r["id"], key) for r, (_, key) in zip(rows, periods, strict=True)]
    spend = await _usage(conn, _SPEND, keys)
    return [
        {
            "id": r["id"],
            "max_limit": r["max_limit"],
            "reset_duration": r["reset_duration"],
            "calendar_aligned": r["calendar_aligned"],
            "current_usage": spend.get(key, Decimal(0)),
            "last_reset": start,
            "owner_type": r["owner_type"],
            "owner_id": r["owner_id"],
        }
        for r, (start, _), key in zip(rows, periods, keys, strict=True)
    ]


async def _rate_limits(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> dict[Owner, Wire]:
    slots: dict[tuple[int, str], tuple[int, str, datetime]] = {}
    for r in rows:
        for kind in ("tokens", "requests"):
            prefix = kind[:-1]
            if r[f"{prefix}_anchor"] is not None:
                _, key = _periods(
                    now,
                    anchor=r[f"{prefix}_anchor"],
                    duration=r[f"{prefix}_reset_duration"],
                    calendar_aligned=False,
                    floor=r[f"{prefix}_usage_floor"],
                )
                slots[r["id"], kind] = (r["id"], kind, key)
    used = await _usage(conn, _RATE_USAGE, list(slots.values()))
    return {
        Owner(r["owner_type"], r["owner_id"]): {
            "token_max_limit": r["token_max_limit"],
            "token_reset_duration": r["token_reset_duration"],
            "request_max_limit": r["request_max_limit"],
            "request_reset_duration": r["request_reset_duration"],
            "token_current_usage": _used(used, slots.get((r["id"], "tokens"))),
            "request_current_usage": _used(used, slots.get((r["id"], "requests"))),
        }
        for r in rows
    }


def _used(used: dict[tuple[Any, ...], Any], slot: tuple[Any, ...] | None) -> int:
    return 0 if slot is None else int(used.get(slot, 0))


async def _usage(
    conn: Connection, sql: str, keys: Iterable[tuple[Any, ...]]
) -> dict[tuple[Any, ...], Any]:
    """The stored usage at each key (a row's leading columns); absent keys: none."""
    keys = list(keys)
    if not keys:
        return {}
    rows = await conn.fetch(sql, *(list(column) for column in zip(*keys, strict=True)))
    return {tuple(r)[:-1]: tuple(r)[-1] for r in rows}
