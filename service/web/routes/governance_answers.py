"""The answers of governance commands (`service.web.answers`): the customer, team or
virtual key as its stream has it after the command, each budget and rate limit with
the current usage the read model has for it at that moment.

The entity is rendered from the folded stream, not from the read model, which may not
have applied the command yet. Usage is the one fold's (`service.domain.ledger`): in
the command's transaction each owner's ledger is restored from the read model
(`projections.governance_usage`), the stream's definition events the read model has
not applied yet are folded into it at their recorded_at, and each budget and
rate-limit half answers its `reading` at the moment of the command, as GET and the
check will. What open holds keep of each limit the entity now has (`held`) is read
from the read model in the same round trip as the cells, and each limit is shown by
the read queries' own `budget_view` and `rate_limit_view`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from projections.governance_readings import Held, Holders, read_at
from projections.governance_reads import budget_view, rate_limit_view
from projections.governance_usage import Book, Owner, books_of
from service.domain import customers, teams, virtual_keys
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamUpdated,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyUpdated,
)
from service.domain.ledger import (
    Ledger,
    define_budgets,
    define_rate_limit,
    open_ledger,
)
from service.eventstore import Connection, Executed
from service.web.answers import (
    BudgetView,
    CustomerSaved,
    CustomerView,
    NewVirtualKeyView,
    ProviderConfigView,
    RateLimitView,
    TeamSaved,
    TeamView,
    VirtualKeyIssued,
    VirtualKeySaved,
    VirtualKeyView,
)


async def customer_saved(
    conn: Connection, step: Executed[customers.Customer], now: datetime
) -> CustomerSaved:
    customer = step.state
    assert customer is not None
    limits = _Limits(
        Owner("customer", customer.id), customer.budgets, customer.rate_limit
    )
    view = await _view(conn, step, [limits], now)
    return CustomerSaved(
        customer=CustomerView(
            id=customer.id,
            name=customer.name,
            budgets=view.budgets(limits),
            rate_limit=view.rate_limit(limits),
            version=step.version,
            created_at=_created_at(step),
            updated_at=_updated_at(step),
        ),
        position=step.position,
    )


async def team_saved(
    conn: Connection, step: Executed[teams.Team], now: datetime
) -> TeamSaved:
    team = step.state
    assert team is not None
    limits = _Limits(Owner("team", team.id), team.budgets, team.rate_limit)
    view = await _view(conn, step, [limits], now)
    return TeamSaved(
        team=TeamView(
            id=team.id,
            name=team.name,
            customer_id=team.customer_id,
            budgets=view.budgets(limits),
            rate_limit=view.rate_limit(limits),
            version=step.version,
            created_at=_created_at(step),
            updated_at=_updated_at(step),
        ),
        position=step.position,
    )


async def virtual_key_saved(
    conn: Connection,
    step: Executed[virtual_keys.VirtualKey],
    now: datetime,
    value: str | None = None,
) -> VirtualKeySaved:
    """An updated key; `value` is the new secret of a rotation."""
    key = await _virtual_key(conn, step, now)
    if value is not None:
        key = msgspec.structs.replace(key, value=value)
    return VirtualKeySaved(virtual_key=key, position=step.position)


async def virtual_key_issued(
    conn: Connection,
    step: Executed[virtual_keys.VirtualKey],
    now: datetime,
    value: str,
) -> VirtualKeyIssued:
    """A created key with its secret `value`."""
    key = msgspec.structs.asdict(await _virtual_key(conn, step, now))
    key["value"] = value
    return VirtualKeyIssued(
        virtual_key=NewVirtualKeyView(**key), position=step.position
    )


async def _virtual_key(
    conn: Connection, step: Executed[virtual_keys.VirtualKey], now: datetime
) -> VirtualKeyView:
    key = step.state
    assert key is not None
    limits = _Limits(Owner("virtual_key", key.id), key.budgets, key.rate_limit)
    configs = [
        (
            c,
            _Limits(
                Owner("provider_config", c.provider_config_id), c.budgets, c.rate_limit
            ),
        )
        for c in key.provider_configs
    ]
    view = await _view(conn, step, [limits, *(owned for _, owned in configs)], now)
    return VirtualKeyView(
        id=key.id,
        name=key.name,
        team_id=key.team_id,
        customer_id=key.customer_id,
        is_active=key.is_active,
        budgets=view.budgets(limits),
        rate_limit=view.rate_limit(limits),
        provider_configs=[
            _provider_config(config, config_limits, view)
            for config, config_limits in configs
        ],
        value_hint=key.value_hint,
        version=step.version,
        created_at=_created_at(step),
        updated_at=_updated_at(step),
    )


def _provider_config(
    config: ProviderConfig, limits: _Limits, view: _View
) -> ProviderConfigView:
    return ProviderConfigView(
        id=config.provider_config_id,
        provider=config.provider,
        allowed_models=(
            ["*"] if config.allowed_models is None else list(config.allowed_models)
        ),
        budgets=view.budgets(limits),
        rate_limit=view.rate_limit(limits),
    )


def _created_at(step: Executed[Any]) -> datetime:
    return step.timeline[0][1]


def _updated_at(step: Executed[Any]) -> datetime:
    return step.timeline[-1][1]


class _Limits(NamedTuple):
    """An owner's budgets and rate limit as its stream has them after the command."""

    owner: Owner
    budgets: Sequence[Budget]
    rate_limit: RateLimit | None


class _View(NamedTuple):
    """Each owner's ledger after the command, what the holds open at `now` keep of
    its limits, and the moment `now` it is read at."""

    ledgers: dict[Owner, Ledger]
    held: Held
    now: datetime

    def budgets(self, limits: _Limits) -> list[BudgetView]:
        ledger = self.ledgers.get(limits.owner)
        meters = {} if ledger is None else {m.id: m for m in ledger.budgets}
        return [
            budget_view(
                limits.owner, b, ledger, meters.get(b.budget_id), self.held, self.now
            )
            for b in limits.budgets
        ]

    def rate_limit(self, limits: _Limits) -> RateLimitView | None:
        if limits.rate_limit is None:
            return None
        ledger = self.ledgers.get(limits.owner)
        return rate_limit_view(
            limits.owner, limits.rate_limit, ledger, self.held, self.now
        )


_VERSION = {
    "customer": "SELECT version FROM governance_customers WHERE id = $1",
    "team": "SELECT version FROM governance_teams WHERE id = $1",
    "virtual_key": "SELECT version FROM governance_virtual_keys WHERE id = $1",
}


async def _view(
    conn: Connection, step: Executed[Any], limits: Sequence[_Limits], now: datetime
) -> _View:
    """The owners' ledgers (the stream's owner first, then its provider configs) as
    the read model has them, with the stream's events it has not applied folded in,
    the cells a reading at `now` sums, and what the holds open at `now` keep of the
    limits the owners have after the command (as GET will show them)."""
    owners = [owned.owner for owned in limits]
    stream_owner = owners[0]
    applied = await conn.fetchval(_VERSION[stream_owner.type], stream_owner.id) or 0
    books = await books_of(conn, owners, now)
    ledgers = {owner: book.ledger for owner, book in books.items()}
    for event, at in step.timeline[applied:]:
        _define(ledgers, stream_owner, event, at)
    kept = {
        owner: books.get(owner) or Book(ledger, [], None)
        for owner, ledger in ledgers.items()
    }
    # A ledger replaced here (a config dropped and added again) reads no stored cells.
    fresh = {o: b for o, b in kept.items() if b.ledger is ledgers[o]}
    holders = Holders(
        [b.budget_id for owned in limits for b in owned.budgets],
        [owned.owner.id for owned in limits if owned.rate_limit is not None],
    )
    return _View(ledgers, await read_at(conn, fresh, now, holders), now)


def _define(
    ledgers: dict[Owner, Ledger], owner: Owner, event: AnyEvent, at: datetime
) -> None:
    """Fold one event of the owner's stream into the ledgers, as the read model and
    the cache do."""
    match event:
        case CustomerCreated() | TeamCreated() | VirtualKeyCreated():
            ledger = ledgers[owner] = open_ledger(at, history=True)
            define_budgets(ledger, event.budgets, at)
            define_rate_limit(ledger, event.rate_limit, at)
            if isinstance(event, VirtualKeyCreated):
                _define_configs(ledgers, event.provider_configs, at)
        case (
            CustomerBudgetsReplaced()
            | TeamBudgetsReplaced()
            | VirtualKeyBudgetsReplaced()
        ):
            if owner in ledgers:
                define_budgets(ledgers[owner], event.budgets, at)
        case CustomerUpdated() | TeamUpdated() | VirtualKeyUpdated():
            if owner in ledgers:
                define_rate_limit(ledgers[owner], event.rate_limit, at)
            if isinstance(event, VirtualKeyUpdated):
                _define_configs(ledgers, event.provider_configs, at)
        case _:
            pass


def _define_configs(
    ledgers: dict[Owner, Ledger], configs: Sequence[ProviderConfig], at: datetime
) -> None:
    """The key's provider configs become `configs`: a new one opens a ledger, one
    no longer listed is dropped."""
    named = {Owner("provider_config", c.provider_config_id) for c in configs}
    for owner in [o for o in ledgers if o.type == "provider_config"]:
        if owner not in named:
            del ledgers[owner]
    for config in configs:
        owner = Owner("provider_config", config.provider_config_id)
        ledger = ledgers.get(owner)
        if ledger is None:
            ledger = ledgers[owner] = open_ledger(at, history=True)
        define_budgets(ledger, config.budgets, at)
        define_rate_limit(ledger, config.rate_limit, at)
