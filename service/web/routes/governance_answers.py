"""The answers of governance commands (`service.web.answers`): the customer, team or
virtual key as its stream has it after the command, each budget and rate limit with
the current usage the read model has for it at that moment.

The entity is rendered from the folded stream, not from the read model, which may not
have applied the command yet. Usage is the one fold's (`service.domain.ledger`): in
the command's transaction each owner's ledger is restored from the read model
(`projections.governance_usage`), the stream's definition events the read model has
not applied yet are folded into it at their recorded_at, and each budget and
rate-limit half answers its `reading` at the moment of the command, as GET and the
check will.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

import msgspec

from projections.governance_readings import read_at
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
    Meter,
    define_budgets,
    define_rate_limit,
    open_ledger,
    reading,
    to_money,
)
from service.eventstore import Connection, Executed
from service.web.answers import (
    BudgetView,
    CustomerSaved,
    CustomerView,
    NewVirtualKeyView,
    OwnerType,
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
    owner = Owner("customer", customer.id)
    view = await _view(conn, step, [owner], now)
    return CustomerSaved(
        customer=CustomerView(
            id=customer.id,
            name=customer.name,
            budgets=view.budgets(customer.budgets, owner),
            rate_limit=view.rate_limit(customer.rate_limit, owner),
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
    owner = Owner("team", team.id)
    view = await _view(conn, step, [owner], now)
    return TeamSaved(
        team=TeamView(
            id=team.id,
            name=team.name,
            customer_id=team.customer_id,
            budgets=view.budgets(team.budgets, owner),
            rate_limit=view.rate_limit(team.rate_limit, owner),
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
    owner = Owner("virtual_key", key.id)
    configs = [
        (c, Owner("provider_config", c.provider_config_id))
        for c in key.provider_configs
    ]
    view = await _view(conn, step, [owner, *(o for _, o in configs)], now)
    return VirtualKeyView(
        id=key.id,
        name=key.name,
        team_id=key.team_id,
        customer_id=key.customer_id,
        is_active=key.is_active,
        budgets=view.budgets(key.budgets, owner),
        rate_limit=view.rate_limit(key.rate_limit, owner),
        provider_configs=[
            _provider_config(config, owner, view) for config, owner in configs
        ],
        value_hint=key.value_hint,
        version=step.version,
        created_at=_created_at(step),
        updated_at=_updated_at(step),
    )


def _provider_config(
    config: ProviderConfig, owner: Owner, view: _View
) -> ProviderConfigView:
    return ProviderConfigView(
        id=config.provider_config_id,
        provider=config.provider,
        allowed_models=(
            ["*"] if config.allowed_models is None else list(config.allowed_models)
        ),
        budgets=view.budgets(config.budgets, owner),
        rate_limit=view.rate_limit(config.rate_limit, owner),
    )


def _created_at(step: Executed[Any]) -> datetime:
    return step.timeline[0][1]


def _updated_at(step: Executed[Any]) -> datetime:
    return step.timeline[-1][1]


class _View(NamedTuple):
    """Each owner's ledger after the command, and the moment it is read at."""

    ledgers: dict[Owner, Ledger]
    now: datetime

    def budgets(self, budgets: Sequence[Budget], owner: Owner) -> list[BudgetView]:
        ledger = self.ledgers.get(owner)
        meters = {} if ledger is None else {m.id: m for m in ledger.budgets}
        views = []
        for b in budgets:
            used, start = self._read(ledger, meters.get(b.budget_id))
            views.append(
                BudgetView(
                    id=b.budget_id,
                    max_limit=b.max_limit,
                    reset_duration=b.reset_duration,
                    calendar_aligned=b.calendar_aligned,
                    current_usage=to_money(used),
                    last_reset=start,
                    owner_type=cast(OwnerType, owner.type),
                    owner_id=owner.id,
                )
            )
        return views

    def rate_limit(
        self, rate_limit: RateLimit | None, owner: Owner
    ) -> RateLimitView | None:
        if rate_limit is None:
            return None
        ledger = self.ledgers.get(owner)
        tokens = None if ledger is None else ledger.tokens
        requests = None if ledger is None else ledger.requests
        return RateLimitView(
            token_max_limit=rate_limit.token_max_limit,
            token_reset_duration=rate_limit.token_reset_duration,
            request_max_limit=rate_limit.request_max_limit,
            request_reset_duration=rate_limit.request_reset_duration,
            token_current_usage=self._read(ledger, tokens)[0],
            request_current_usage=self._read(ledger, requests)[0],
        )

    def _read(self, ledger: Ledger | None, meter: Meter | None) -> tuple[int, datetime]:
        if ledger is None or meter is None:
            return 0, self.now
        used, start, _ = reading(ledger, meter, self.now)
        return used, start


_VERSION = {
    "customer": "SELECT version FROM governance_customers WHERE id = $1",
    "team": "SELECT version FROM governance_teams WHERE id = $1",
    "virtual_key": "SELECT version FROM governance_virtual_keys WHERE id = $1",
}


async def _view(
    conn: Connection, step: Executed[Any], owners: Sequence[Owner], now: datetime
) -> _View:
    """The owners' ledgers (the stream's owner first, then its provider configs) as
    the read model has them, with the stream's events it has not applied folded in,
    and the cells a reading at `now` sums."""
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
    await read_at(conn, fresh, now)
    return _View(ledgers, now)


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
