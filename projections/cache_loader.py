"""Fills the enforcement cache from the governance read model and keeps it current:
one snapshot of the governance_* tables at the SQL projector's checkpoint, then an
in-memory projector (projections.runner) that tails the log from that checkpoint.

With an empty read model the checkpoint is the start of the log, so the tail folds
the whole log: the same cache, only slower to start.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec
import structlog

from projections import governance_holds, runner
from projections.cache import GovernanceCache
from projections.cache_entries import Customer, ProviderConfigState, Team, VirtualKey
from projections.governance_usage import Owner, all_owners, stored_ledgers
from projections.runner import FoldRows
from service import eventstore
from service.domain.ledger import (
    BUDGET,
    Ledger,
    StoredLedger,
    kept_from,
    meters,
    open_ledger,
    restore,
    to_nanos,
)
from service.eventstore import Connection
from service.records import Checkpoint, Refused

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
# The cells a ledger without history keeps: keys from `kept_from` on.
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


async def load(
    conn: Connection, now: datetime | None = None
) -> tuple[GovernanceCache, Checkpoint]:
    """The cache as of the read model's checkpoint, from one consistent snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = await runner.load_checkpoint(conn, GOVERNANCE_PROJECTION)
        high_water = await eventstore.high_water(conn, checkpoint)
        at = datetime.now(UTC) if now is None else now
        customers = await conn.fetch(_CUSTOMERS)
        teams = await conn.fetch(_TEAMS)
        keys = await conn.fetch(_VIRTUAL_KEYS)
        configs = await conn.fetch(_PROVIDER_CONFIGS)
        ledgers = await _ledgers(conn, at)
        holds = await governance_holds.open_holds(conn, at)

    def ledger(owner_type: str, owner_id: str) -> Ledger:
        found = ledgers.get(Owner(owner_type, owner_id))
        return open_ledger(at) if found is None else found

    cache = GovernanceCache()
    cache.restore(
        customers=[
            Customer(
                id=r["id"], version=r["version"], ledger=ledger("customer", r["id"])
            )
            for r in customers
        ],
        teams=[
            Team(
                id=r["id"],
                version=r["version"],
                customer_id=r["customer_id"],
                ledger=ledger("team", r["id"]),
            )
            for r in teams
        ],
        keys=_keys(keys, configs, ledger),
        checkpoint=checkpoint,
        high_water=high_water,
    )
    for hold in holds:
        cache.hold(hold)
    return cache, checkpoint


async def _ledgers(conn: Connection, now: datetime) -> dict[Owner, Ledger]:
    """Every owner's ledger as a cache folds it: restored with the cells it keeps
    (from `kept_from` at its clock on), read at `now`."""
    states = await stored_ledgers(conn, await all_owners(conn))
    budget_since: list[tuple[str, datetime]] = []
    rate_since: list[tuple[int, str, datetime]] = []
    for state, _, rate in states.values():
        for meter in meters(restore(state, now=now, history=True)):
            since = kept_from(meter, state.clock)
            if meter.kind == BUDGET:
                budget_since.append((meter.id, since))
            elif rate is not None:
                rate_since.append((rate["id"], meter.kind, since))
    spend: defaultdict[str, dict[datetime, int]] = defaultdict(dict)
    if budget_since:
        for budget_id, key, amount in await conn.fetch(
            _SPEND, *map(list, zip(*budget_since, strict=True))
        ):
            spend[budget_id][key] = to_nanos(amount)
    used: defaultdict[tuple[int, str], dict[datetime, int]] = defaultdict(dict)
    if rate_since:
        for limit_id, kind, key, amount in await conn.fetch(
            _RATE_USAGE, *map(list, zip(*rate_since, strict=True))
        ):
            used[limit_id, kind][key] = amount
    ledgers = {}
    for owner, (state, _, rate) in states.items():
        rate_id: int | None = None if rate is None else rate["id"]
        cells = [
            spend.get(m.id, {})
            if m.kind == BUDGET
            else used.get((rate_id, m.kind), {})
            if rate_id is not None
            else {}
            for m in state.meters
        ]
        full = StoredLedger(
            clock=state.clock,
            meters=tuple(
                msgspec.structs.replace(m, cells=tuple(sorted(c.items())))
                for m, c in zip(state.meters, cells, strict=True)
            ),
            pending=state.pending,
        )
        ledgers[owner] = restore(full, now=now)
    return ledgers


def _keys(
    rows: Sequence[asyncpg.Record],
    config_rows: Sequence[asyncpg.Record],
    ledger: Callable[[str, str], Ledger],
) -> list[VirtualKey]:
    configs: defaultdict[str, list[ProviderConfigState]] = defaultdict(list)
    for c in config_rows:
        models = c["allowed_models"]
        configs[c["virtual_key_id"]].append(
            ProviderConfigState(
                id=c["id"],
                provider=c["provider"],
                models=None if models is None or "*" in models else frozenset(models),
                ledger=ledger("provider_config", c["id"]),
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
            ledger=ledger("virtual_key", r["id"]),
        )
        for r in rows
    ]


# --- the running cache -------------------------------------------------------------


def applier(cache: GovernanceCache) -> FoldRows:
    """The cache's tail: rows as read, usage decoded only into what it folds and
    charged a run at a time (GovernanceCache.fold_usage), every other event
    decoded and applied whole."""

    def fold(rows: Sequence[asyncpg.Record]) -> list[Refused]:
        refused: list[Refused] = []
        checkpoint = None
        try:
            for row, usage in zip(rows, eventstore.usages_of(rows), strict=True):
                if usage is not None:
                    tx_id, position = row["tx_id"], row["global_position"]
                    cache.fold_usage(usage, tx_id, position, row["recorded_at"])
                    checkpoint = (tx_id, position)
                    continue
                read = eventstore.record_or_refused(row)
                if isinstance(read, Refused):
                    refused.append(read)
                    continue
                cache.apply(read)  # settles the usage folded before it first
                checkpoint = None
        finally:
            # Also when a row fails: what was folded is charged, and marked seen.
            cache.settle()
            if checkpoint is not None:
                cache.checkpoint = Checkpoint(*checkpoint)
        return refused

    return FoldRows(fold, eventstore.read_rows)
