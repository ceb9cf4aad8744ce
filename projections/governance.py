"""The governance read model's apply: events fold into the governance_* tables
(customers, teams, virtual keys, provider configs, budgets, rate limits), and runs of
usage are charged by `projections.governance_usage`. The GET side is
`projections.governance_reads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import assert_never

import asyncpg

from projections import governance_holds
from projections.governance_usage import (
    Owner,
    budgets_of,
    charge,
    forget_rate_usage,
    move_spend,
    periods,
    rate_limits_of,
)
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
    ReservationHeld,
    ReservationReleased,
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
from service.eventstore import Connection
from service.records import RecordedEvent

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


async def _charge(
    conn: Connection, usage: Sequence[tuple[RecordedEvent, UsageRecorded]]
) -> None:
    await charge(conn, usage)
    await governance_holds.settle(conn, [event for _, event in usage])


async def _apply_event(conn: Connection, record: RecordedEvent) -> None:
    e, v, at = record.event, record.stream_version, record.recorded_at
    match e:
        case CustomerCreated():
            if await _wrote(conn, _INSERT_CUSTOMER, e.customer_id, v, at, e.name):
                owner = Owner("customer", e.customer_id)
                await _replace_budgets(conn, owner, e.budgets, v, at, new=True)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at, new=True)
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
                await _replace_budgets(conn, owner, e.budgets, v, at, new=True)
                await _set_rate_limit(conn, owner, e.rate_limit, v, at, new=True)
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
                await _replace_budgets(conn, owner, e.budgets, v, at, new=True)
                await _set_key_settings(conn, owner, e, v, at, new=True)
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
            await governance_holds.drop_key(conn, e.virtual_key_id)
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
    owner: Owner,
    e: VirtualKeyCreated | VirtualKeyUpdated,
    version: int,
    at: datetime,
    *,
    new: bool = False,
) -> None:
    """`new`: the key was inserted just now, so it has no rate limit or provider
    configs yet (they reference it), and none need looking up or deleting."""
    await _set_rate_limit(conn, owner, e.rate_limit, version, at, new=new)
    await _replace_provider_configs(
        conn, owner.id, e.provider_configs, version, at, new=new
    )


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
    *,
    new: bool = False,
) -> None:
    """The key's provider configs become exactly `configs` (kept by their id)."""
    if not new:
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


async def _replace_budgets(
    conn: Connection,
    owner: Owner,
    budgets: Sequence[Budget],
    version: int,
    at: datetime,
    *,
    new: bool = False,
) -> None:
    """The owner's budgets become exactly `budgets`, as the event lists them.

    A new budget is anchored at `at` with its usage floor there; a kept one keeps its
    anchor, and `reset_usage` moves its floor to `at`. Turning calendar_aligned off
    keeps the current period's usage: it moves to the rolling period containing `at`.
    `new`: the owner was inserted just now, so it has no budgets yet (they reference
    it) and there is nothing to look up or delete.
    """
    current: dict[str, asyncpg.Record] = {}
    if not new:
        current = {r["id"]: r for r in await budgets_of(conn, [owner])}
        await conn.execute(
            _DELETE_DROPPED_BUDGETS, *owner, [b.budget_id for b in budgets]
        )
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
            _, was = periods(
                at,
                anchor=anchor,
                duration=old["reset_duration"],
                calendar_aligned=True,
                floor=floor,
            )
            _, now_at = periods(
                at,
                anchor=anchor,
                duration=budget.reset_duration,
                calendar_aligned=False,
                floor=floor,
            )
            if was != now_at:
                await move_spend(conn, budget.budget_id, was, now_at)
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


async def _set_rate_limit(
    conn: Connection,
    owner: Owner,
    rate_limit: RateLimit | None,
    version: int,
    at: datetime,
    *,
    new: bool = False,
) -> None:
    """Each limit keeps its anchor unless it is new or its reset duration changed.

    `new`: the owner was inserted just now and has no rate limit yet.
    """
    if rate_limit is None:
        if not new:
            await conn.execute(_DELETE_RATE_LIMIT, *owner)
        return
    found = [] if new else await rate_limits_of(conn, [owner])
    old = found[0] if found else None
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
                await forget_rate_usage(conn, rate_limit_id, kind)


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
