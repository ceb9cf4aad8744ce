"""The governance read queries: customers, teams, virtual keys and budgets from the
governance_* tables as their views (`projections.governance_views`), each budget and
rate limit with the usage of the period that contains `now`.

Each owner's ledger is restored from the read model with the cells of the period
that contains `now` (`projections.governance_readings`, which also reads what open
holds keep), and each limit shows its `reading` (`service.domain.ledger`):
`current_usage` is its `used`, `last_reset` its `start`, `held` what the holds open
at `now` keep of it. `budget_view` and `rate_limit_view` say so for the command
answers too (`service.web.routes.governance_answers`), so answers and reads agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, TypeVar, cast

import asyncpg

from projections.governance_readings import (
    Held,
    Remembered,
    asked_at,
    holders_of,
    read_asked,
    read_at,
    read_owner,
)
from projections.governance_usage import Book, Owner, Row, books_of
from projections.governance_views import (
    BudgetView,
    CustomerView,
    OwnerType,
    ProviderConfigView,
    RateLimitView,
    TeamView,
    VirtualKeyView,
)
from service.domain.events import Budget, RateLimit
from service.domain.ledger import Ledger, Meter, plain_money, reading, to_money
from service.errors import NotFound
from service.eventstore import Connection

T = TypeVar("T")

_CUSTOMERS = """
SELECT id, name, version, created_at, updated_at FROM governance_customers
WHERE $1::text IS NULL OR id = $1
ORDER BY created_at, id
LIMIT $2 OFFSET $3
"""
_TEAMS = """
SELECT id, name, customer_id, version, created_at, updated_at FROM governance_teams
WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR customer_id = $2)
ORDER BY created_at, id
LIMIT $3 OFFSET $4
"""
_VIRTUAL_KEYS = """
SELECT id, name, team_id, customer_id, is_active, value_hint, version, created_at,
    updated_at
FROM governance_virtual_keys
WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR team_id = $2)
    AND ($3::text IS NULL OR customer_id = $3)
ORDER BY created_at, id
LIMIT $4 OFFSET $5
"""
_PROVIDER_CONFIGS = """
SELECT id, virtual_key_id, provider, allowed_models FROM governance_provider_configs
WHERE virtual_key_id = ANY($1::text[])
ORDER BY virtual_key_id, ordinal
"""
_BUDGETS = """
SELECT b.id, owner_type, owner_id FROM governance_budgets b
WHERE ($1::text IS NULL OR owner_type = $1) AND ($2::text IS NULL OR owner_id = $2)
ORDER BY b.created_at, owner_type, owner_id, b.ordinal
LIMIT $3 OFFSET $4
"""


class Page(NamedTuple):
    """Which of a list's matches to answer, in its order: from `offset` on, at most
    `limit` (None: every one)."""

    limit: int | None = None
    offset: int = 0

    def of(self, items: list[T]) -> list[T]:
        end = None if self.limit is None else self.offset + self.limit
        return items[self.offset : end]


EVERY = Page()


async def fetch_customer(
    conn: Connection, customer_id: str, now: datetime
) -> CustomerView:
    rows = await conn.fetch(_CUSTOMERS, customer_id, *EVERY)
    if not rows:
        raise NotFound(f"customer {customer_id} does not exist")
    return (await _customers(conn, rows, now))[0]


async def list_customers(
    conn: Connection, now: datetime, page: Page = EVERY
) -> list[CustomerView]:
    return await _customers(conn, await conn.fetch(_CUSTOMERS, None, *page), now)


async def fetch_team(conn: Connection, team_id: str, now: datetime) -> TeamView:
    rows = await conn.fetch(_TEAMS, team_id, None, *EVERY)
    if not rows:
        raise NotFound(f"team {team_id} does not exist")
    return (await _teams(conn, rows, now))[0]


async def list_teams(
    conn: Connection,
    now: datetime,
    customer_id: str | None = None,
    page: Page = EVERY,
) -> list[TeamView]:
    rows = await conn.fetch(_TEAMS, None, customer_id, *page)
    return await _teams(conn, rows, now)


async def fetch_virtual_key(
    conn: Connection, virtual_key_id: str, now: datetime
) -> VirtualKeyView:
    rows = await conn.fetch(_VIRTUAL_KEYS, virtual_key_id, None, None, *EVERY)
    if not rows:
        raise NotFound(f"virtual key {virtual_key_id} does not exist")
    return (await _virtual_keys(conn, rows, now))[0]


async def list_virtual_keys(
    conn: Connection,
    now: datetime,
    team_id: str | None = None,
    customer_id: str | None = None,
    page: Page = EVERY,
) -> list[VirtualKeyView]:
    rows = await conn.fetch(_VIRTUAL_KEYS, None, team_id, customer_id, *page)
    return await _virtual_keys(conn, rows, now)


async def list_budgets(
    conn: Connection,
    now: datetime,
    owner_type: str | None = None,
    owner_id: str | None = None,
    remembered: Remembered | None = None,
    page: Page = EVERY,
) -> list[BudgetView]:
    """The budgets (`page` of them), of one owner type or of one owner if given.
    One owner's come with its ledger, in _BUDGETS' order (a round trip fewer for
    the most common read of a gateway), and what its reading asked for is
    `remembered`."""
    if owner_type is not None and owner_id is not None:
        owner = Owner(owner_type, owner_id)
        books = await books_of(conn, [owner], now)
        asked = asked_at(books, now, holders_of(books))
        if remembered is not None:
            remembered.put(owner, asked)
        held = await read_asked(conn, books, now, asked)
        return page.of(_owner_budgets(owner, books, held, now))
    rows = await conn.fetch(_BUDGETS, owner_type, owner_id, *page)
    owners = sorted({Owner(r["owner_type"], r["owner_id"]) for r in rows})
    budgets, _ = await owned_by(conn, owners, now)
    by_id = {b.id: b for owned in budgets.values() for b in owned}
    return [by_id[r["id"]] for r in rows]


async def owner_budgets_at_once(
    conn: Connection,
    now: datetime,
    owner: Owner,
    remembered: Remembered,
    page: Page = EVERY,
) -> list[BudgetView] | None:
    """`list_budgets` of one owner in one statement, outside a transaction, when
    its reading asks what it asked last time (`read_owner`); None: read it with
    `list_budgets` in one read-only transaction."""
    found = await read_owner(conn, owner, now, remembered)
    return None if found is None else page.of(_owner_budgets(owner, *found, now))


def _owner_budgets(
    owner: Owner, books: dict[Owner, Book], held: Held, now: datetime
) -> list[BudgetView]:
    if owner not in books:
        return []
    views = _budgets(books, held, now)[owner]
    created = [r["created_at"] for r in books[owner].budgets]
    return [views[i] for i in sorted(range(len(views)), key=created.__getitem__)]


async def owned_by(
    conn: Connection, owners: Sequence[Owner], now: datetime
) -> tuple[defaultdict[Owner, list[BudgetView]], dict[Owner, RateLimitView]]:
    """The budgets and rate limits of `owners`, with their current usage."""
    books, held = await _books(conn, owners, now)
    return _budgets(books, held, now), _rate_limits(books, held, now)


async def _books(
    conn: Connection, owners: Sequence[Owner], now: datetime
) -> tuple[dict[Owner, Book], Held]:
    """The ledgers of `owners` with the cells a reading at `now` sums, and what
    open holds keep of them: two round trips."""
    books = await books_of(conn, owners, now)
    return books, await read_at(conn, books, now, holders_of(books))


async def _customers(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[CustomerView]:
    owners = [Owner("customer", r["id"]) for r in rows]
    budgets, rate_limits = await owned_by(conn, owners, now)
    return [
        CustomerView(
            id=r["id"],
            name=r["name"],
            budgets=budgets[o],
            rate_limit=rate_limits.get(o),
            version=r["version"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
        )
        for r, o in zip(rows, owners, strict=True)
    ]


async def _teams(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[TeamView]:
    owners = [Owner("team", r["id"]) for r in rows]
    budgets, rate_limits = await owned_by(conn, owners, now)
    return [
        TeamView(
            id=r["id"],
            name=r["name"],
            customer_id=r["customer_id"],
            budgets=budgets[o],
            rate_limit=rate_limits.get(o),
            version=r["version"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
        )
        for r, o in zip(rows, owners, strict=True)
    ]


async def _virtual_keys(
    conn: Connection, rows: Sequence[asyncpg.Record], now: datetime
) -> list[VirtualKeyView]:
    owners = [Owner("virtual_key", r["id"]) for r in rows]
    configs = await conn.fetch(_PROVIDER_CONFIGS, [o.id for o in owners])
    config_owners = [Owner("provider_config", c["id"]) for c in configs]
    budgets, rate_limits = await owned_by(conn, owners + config_owners, now)
    configs_of: defaultdict[str, list[ProviderConfigView]] = defaultdict(list)
    for c, o in zip(configs, config_owners, strict=True):
        models = c["allowed_models"]
        configs_of[c["virtual_key_id"]].append(
            ProviderConfigView(
                id=c["id"],
                provider=c["provider"],
                allowed_models=["*"] if models is None else models,
                budgets=budgets[o],
                rate_limit=rate_limits.get(o),
            )
        )
    return [
        VirtualKeyView(
            id=r["id"],
            name=r["name"],
            team_id=r["team_id"],
            customer_id=r["customer_id"],
            is_active=r["is_active"],
            budgets=budgets[o],
            rate_limit=rate_limits.get(o),
            provider_configs=configs_of[r["id"]],
            value_hint=r["value_hint"],
            version=r["version"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
        )
        for r, o in zip(rows, owners, strict=True)
    ]


def budget_view(
    owner: Owner,
    budget: Budget,
    ledger: Ledger | None,
    meter: Meter | None,
    held: Held,
    now: datetime,
) -> BudgetView:
    """`budget` of `owner` at `now`: the reading of its `meter` in `ledger` and what
    the holds open at `now` keep of it."""
    used, start = _reading(ledger, meter, now)
    return BudgetView(
        id=budget.budget_id,
        max_limit=plain_money(budget.max_limit),
        reset_duration=budget.reset_duration,
        calendar_aligned=budget.calendar_aligned,
        current_usage=to_money(used),
        last_reset=start,
        owner_type=cast(OwnerType, owner.type),
        owner_id=owner.id,
        held=plain_money(held.of_budget(budget.budget_id)),
    )


def rate_limit_view(
    owner: Owner,
    rate_limit: RateLimit,
    ledger: Ledger | None,
    held: Held,
    now: datetime,
) -> RateLimitView:
    """`rate_limit` of `owner` at `now`: the readings of its halves in `ledger` and
    what the holds open at `now` keep of it."""
    tokens = None if ledger is None else ledger.tokens
    requests = None if ledger is None else ledger.requests
    token_held, request_held = held.of_rate_limit(owner.id)
    return RateLimitView(
        token_max_limit=rate_limit.token_max_limit,
        token_reset_duration=rate_limit.token_reset_duration,
        request_max_limit=rate_limit.request_max_limit,
        request_reset_duration=rate_limit.request_reset_duration,
        token_current_usage=_reading(ledger, tokens, now)[0],
        request_current_usage=_reading(ledger, requests, now)[0],
        token_held=token_held,
        request_held=request_held,
    )


def _reading(
    ledger: Ledger | None, meter: Meter | None, now: datetime
) -> tuple[int, datetime]:
    """The meter's usage and period start at `now`; 0 from `now` without a meter (a
    limit the ledger has not defined yet)."""
    if ledger is None or meter is None:
        return 0, now
    used, start, _ = reading(ledger, meter, now)
    return used, start


def _budgets(
    books: dict[Owner, Book], held: Held, now: datetime
) -> defaultdict[Owner, list[BudgetView]]:
    budgets: defaultdict[Owner, list[BudgetView]] = defaultdict(list)
    for owner, book in books.items():
        ledger = book.ledger
        budgets[owner] = [
            budget_view(owner, _budget(r), ledger, meter, held, now)
            for r, meter in zip(book.budgets, ledger.budgets, strict=True)
        ]
    return budgets


def _rate_limits(
    books: dict[Owner, Book], held: Held, now: datetime
) -> dict[Owner, RateLimitView]:
    return {
        owner: rate_limit_view(owner, _rate_limit(r), book.ledger, held, now)
        for owner, book in books.items()
        if (r := book.rate_limit) is not None
    }


def _budget(r: Row) -> Budget:
    return Budget(
        budget_id=r["id"],
        max_limit=r["max_limit"],
        reset_duration=r["reset_duration"],
        calendar_aligned=r["calendar_aligned"],
    )


def _rate_limit(r: Row) -> RateLimit:
    return RateLimit(
        token_max_limit=r["token_max_limit"],
        token_reset_duration=r["token_reset_duration"],
        request_max_limit=r["request_max_limit"],
        request_reset_duration=r["request_reset_duration"],
    )
