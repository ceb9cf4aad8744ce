"""The answers of governance commands (`service.web.answers`): the customer, team or
virtual key as its stream has it after the command, each budget and rate limit with
the current usage the read model has for it at that moment.

The entity is rendered from the folded stream, not from the read model, which may not
have applied the command yet. Usage lives only in the read model, so it is read with
the read queries (`projections.governance_reads`) inside the command's transaction: a
kept budget shows what the read model counts for it now, a budget created or reset by
the command shows 0; a rate-limit half shows the read model's usage while it keeps
its reset duration there, else (new, or its duration changed) 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, cast

import msgspec

from projections.governance_reads import owned_by
from projections.governance_usage import Owner
from service.domain import customers, teams, virtual_keys
from service.domain.budgets import parse_duration, period_start
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyUpdated,
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
    """What rendering needs beside an entity's state."""

    anchors: dict[str, datetime]  # budget id → recorded_at of the event creating it
    floors: dict[str, datetime]  # budget id → its creation or its latest reset
    usage: dict[str, Decimal]  # budget id → its current usage in the read model
    rate_limits: dict[Owner, RateLimitView]  # the read model's, with current usage
    now: datetime

    def budgets(self, budgets: Sequence[Budget], owner: Owner) -> list[BudgetView]:
        return [
            BudgetView(
                id=b.budget_id,
                max_limit=b.max_limit,
                reset_duration=b.reset_duration,
                calendar_aligned=b.calendar_aligned,
                current_usage=(
                    Decimal(0)
                    if self.floors.get(b.budget_id, self.now) >= self.now
                    else self.usage.get(b.budget_id, Decimal(0))
                ),
                last_reset=period_start(
                    self.now,
                    anchor=self.anchors.get(b.budget_id, self.now),
                    duration=parse_duration(b.reset_duration),
                    calendar_aligned=b.calendar_aligned,
                ),
                owner_type=cast(OwnerType, owner.type),
                owner_id=owner.id,
            )
            for b in budgets
        ]

    def rate_limit(
        self, rate_limit: RateLimit | None, owner: Owner
    ) -> RateLimitView | None:
        """The limit as decided, with the read model's usage of each half while
        that half keeps its reset duration there (else, new or reshaped, 0)."""
        if rate_limit is None:
            return None
        stored = self.rate_limits.get(owner)
        token_usage = request_usage = 0
        if stored is not None:
            if (
                stored.token_max_limit is not None
                and stored.token_reset_duration == rate_limit.token_reset_duration
            ):
                token_usage = stored.token_current_usage
            if (
                stored.request_max_limit is not None
                and stored.request_reset_duration == rate_limit.request_reset_duration
            ):
                request_usage = stored.request_current_usage
        return RateLimitView(
            token_max_limit=rate_limit.token_max_limit,
            token_reset_duration=rate_limit.token_reset_duration,
            request_max_limit=rate_limit.request_max_limit,
            request_reset_duration=rate_limit.request_reset_duration,
            token_current_usage=token_usage,
            request_current_usage=request_usage,
        )


async def _view(
    conn: Connection, step: Executed[Any], owners: Sequence[Owner], now: datetime
) -> _View:
    anchors: dict[str, datetime] = {}
    floors: dict[str, datetime] = {}
    for event, recorded_at in step.timeline:
        for budget in _budgets_in(event):
            anchors.setdefault(budget.budget_id, recorded_at)
            if budget.reset_usage or budget.budget_id not in floors:
                floors[budget.budget_id] = recorded_at
    budgets, rate_limits = await owned_by(conn, owners, now)
    usage = {b.id: b.current_usage for owned in budgets.values() for b in owned}
    return _View(anchors, floors, usage, rate_limits, now)


def _budgets_in(event: AnyEvent) -> Iterator[Budget]:
    match event:
        case (
            CustomerCreated()
            | CustomerBudgetsReplaced()
            | TeamCreated()
            | TeamBudgetsReplaced()
            | VirtualKeyBudgetsReplaced()
        ):
            yield from event.budgets
        case VirtualKeyCreated():
            yield from event.budgets
            for config in event.provider_configs:
                yield from config.budgets
        case VirtualKeyUpdated():
            for config in event.provider_configs:
                yield from config.budgets
