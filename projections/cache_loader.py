"""Fills the enforcement cache from the governance read model and keeps it current:
one snapshot of the governance_* tables at the SQL projector's checkpoint, then an
in-memory projector (projections.runner) that tails the log from that checkpoint.

With an empty read model the checkpoint is the start of the log, so the tail folds
the whole log: the same cache, only slower to start.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple, TypedDict

import asyncpg
import structlog

from projections import governance_holds, runner
from projections.cache import (
    Customer,
    GovernanceCache,
    ProviderConfigState,
    Team,
    VirtualKey,
)
from projections.meters import Meter, restored_meter, to_nanos
from projections.runner import Apply
from service.domain.budgets import parse_duration, period_bounds
from service.eventstore import Connection
from service.records import Checkpoint, RecordedEvent

log = structlog.get_logger()

# The SQL projector whose tables and checkpoint the cache starts from (runner.py).
GOVERNANCE_PROJECTION = "governance"
CACHE_PROJECTION = "cache"

_CUSTOMERS = "SELECT id, version FROM governance_customers"
_TEAMS = "SELECT id, customer_id, version FROM governance_teams"
_VIRTUAL_KEYS = """
SELECT id, value_sha256, team_id, customer_id, is_active, version
FROM governance_virtual_keys
"""
_PROVIDER_CONFIGS = """
SELECT id, virtual_key_id, provider, allowed_models FROM governance_provider_configs
ORDER BY virtual_key_id, ordinal
"""
_BUDGETS = """
SELECT id, owner_type, owner_id, max_limit, reset_duration, calendar_aligned, anchor,
    usage_floor
FROM governance_budgets ORDER BY owner_type, owner_id, ordinal
"""
_RATE_LIMITS = """
SELECT id, owner_type, owner_id, token_max_limit, token_reset_duration, token_anchor,
    token_usage_floor, request_max_limit, request_reset_duration, request_anchor,
    request_usage_floor
FROM governance_rate_limits
"""
# Usage of the period containing now and later ones; keys are effective starts.
_SPEND = """
SELECT s.budget_id, s.period_start, s.spend FROM governance_budget_spend s
JOIN unnest($1::text[], $2::timestamptz[]) AS k(budget_id, since) USING (budget_id)
WHERE s.period_start >= k.since
"""
_RATE_USAGE = """
SELECT u.rate_limit_id, u.kind, u.period_start, u.used
FROM governance_rate_limit_usage u
JOIN unnest($1::bigint[], $2::text[], $3::timestamptz[])
    AS k(rate_limit_id, kind, since) USING (rate_limit_id, kind)
WHERE u.period_start >= k.since
"""

# (owner_type, owner_id) → meters, in the owner's order.
Owned = defaultdict[tuple[str, str], list[Meter]]


async def load(
    conn: Connection, now: datetime | None = None
) -> tuple[GovernanceCache, Checkpoint]:
    """The cache as of the read model's checkpoint, from one consistent snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = await runner.load_checkpoint(conn, GOVERNANCE_PROJECTION)
        at = datetime.now(UTC) if now is None else now
        customers = await conn.fetch(_CUSTOMERS)
        teams = await conn.fetch(_TEAMS)
        keys = await conn.fetch(_VIRTUAL_KEYS)
        configs = await conn.fetch(_PROVIDER_CONFIGS)
        budgets = await conn.fetch(_BUDGETS)
        rate_limits = await conn.fetch(_RATE_LIMITS)
        owned = _Owned(
            budgets=await _budget_meters(conn, budgets, at),
            rates=await _rate_meters(conn, rate_limits, at),
        )
        holds = await governance_holds.open_holds(conn, at)
    cache = GovernanceCache()
    cache.restore(
        customers=[
            Customer(id=r["id"], version=r["version"], **owned.of("customer", r["id"]))
            for r in customers
        ],
        teams=[
            Team(
                id=r["id"],
                version=r["version"],
                customer_id=r["customer_id"],
                **owned.of("team", r["id"]),
            )
            for r in teams
        ],
        keys=_keys(keys, configs, owned),
        checkpoint=checkpoint,
    )
    for hold in holds:
        cache.hold(hold)
    return cache, checkpoint


class _Limits(TypedDict):
    budgets: tuple[Meter, ...]
    rates: tuple[Meter, ...]


class _Owned(NamedTuple):
    budgets: Owned
    rates: Owned

    def of(self, owner_type: str, owner_id: str) -> _Limits:
        """An owner's `budgets` and `rates` (tokens before requests)."""
        owner = (owner_type, owner_id)
        rates = sorted(self.rates.get(owner, ()), key=lambda m: m.name != "tokens")
        return {"budgets": tuple(self.budgets.get(owner, ())), "rates": tuple(rates)}


def _effective_start(
    now: datetime, anchor: datetime, floor: datetime, duration: str, aligned: bool
) -> datetime:
    """The read model's key of the period containing `now`."""
    start, _ = period_bounds(
        now,
        anchor=anchor,
        duration=parse_duration(duration),
        calendar_aligned=aligned,
    )
    return max(start, floor)


async def _budget_meters(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> Owned:
    since = [
        _effective_start(
            now,
            r["anchor"],
            r["usage_floor"],
            r["reset_duration"],
            r["calendar_aligned"],
        )
        for r in rows
    ]
    usage: defaultdict[str, dict[datetime, int]] = defaultdict(dict)
    for s in await conn.fetch(_SPEND, [r["id"] for r in rows], since):
        usage[s["budget_id"]][s["period_start"]] = to_nanos(s["spend"])
    owned: Owned = defaultdict(list)
    for r in rows:
        owned[r["owner_type"], r["owner_id"]].append(
            restored_meter(
                r["id"],
                limit=to_nanos(r["max_limit"]),
                reset_duration=r["reset_duration"],
                calendar_aligned=r["calendar_aligned"],
                anchor=r["anchor"],
                floor=r["usage_floor"],
                usage=usage[r["id"]],
                now=now,
            )
        )
    return owned


async def _rate_meters(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> Owned:
    halves = [
        (r, kind, kind[:-1])
        for r in rows
        for kind in ("tokens", "requests")
        if r[f"{kind[:-1]}_max_limit"] is not None
    ]
    since = [
        _effective_start(
            now,
            r[f"{prefix}_anchor"],
            r[f"{prefix}_usage_floor"],
            r[f"{prefix}_reset_duration"],
            False,
        )
        for r, _, prefix in halves
    ]
    usage: defaultdict[tuple[int, str], dict[datetime, int]] = defaultdict(dict)
    for u in await conn.fetch(
        _RATE_USAGE, [r["id"] for r, _, _ in halves], [k for _, k, _ in halves], since
    ):
        usage[u["rate_limit_id"], u["kind"]][u["period_start"]] = u["used"]
    owned: Owned = defaultdict(list)
    for r, kind, prefix in halves:
        owned[r["owner_type"], r["owner_id"]].append(
            restored_meter(
                kind,
                limit=r[f"{prefix}_max_limit"],
                reset_duration=r[f"{prefix}_reset_duration"],
                calendar_aligned=False,
                anchor=r[f"{prefix}_anchor"],
                floor=r[f"{prefix}_usage_floor"],
                usage=usage[r["id"], kind],
                now=now,
            )
        )
    return owned


def _keys(
    rows: Sequence[asyncpg.Record],
    config_rows: Sequence[asyncpg.Record],
    owned: _Owned,
) -> list[VirtualKey]:
    configs: defaultdict[str, list[ProviderConfigState]] = defaultdict(list)
    for c in config_rows:
        models = c["allowed_models"]
        configs[c["virtual_key_id"]].append(
            ProviderConfigState(
                id=c["id"],
                provider=c["provider"],
                models=None if models is None or "*" in models else frozenset(models),
                **owned.of("provider_config", c["id"]),
            )
        )
    return [
        VirtualKey(
            id=r["id"],
            version=r["version"],
            value_sha256=r["value_sha256"],
            is_active=r["is_active"],
            team_id=r["team_id"],
            customer_id=r["customer_id"],
            providers=tuple(configs[r["id"]]) or None,
            **owned.of("virtual_key", r["id"]),
        )
        for r in rows
    ]


# --- the running cache -------------------------------------------------------------


def applier(cache: GovernanceCache) -> Apply:
    async def apply(_conn: Connection, records: Sequence[RecordedEvent]) -> None:
        for record in records:
            cache.apply(record)

    return apply
