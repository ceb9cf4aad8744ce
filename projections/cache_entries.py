"""The enforcement cache's entries: customers, teams, virtual keys and provider
configs (`Owner`), each with its `Ledger` and the aggregates a check reads, and the
holds on them; the answers a check gives (`CheckResult`); and what one owner or one
chain decides: its headroom, the rolling of its periods, the budget or rate limit
that blocks it.

Pure, as `projections.cache` (which keeps the entries by id and folds the log into
them) is: no I/O, no clock (`now` is a parameter).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar, Literal

import msgspec

from projections.governance_views import OwnerType
from service.domain import ledger as fold
from service.domain.events import Budget, ProviderConfig, RateLimit
from service.domain.ledger import TOKENS, Ledger, Meter, open_ledger, to_money, to_nanos
from service.domain.usage import UsageChain

# Headroom of an owner without budgets (or rate limits): larger than any limit.
UNLIMITED = 1 << 127
FOREVER = datetime.max.replace(tzinfo=UTC)
_HUGE = Decimal(10) ** 19


# --- state -------------------------------------------------------------------------


CheckReason = Literal[
    "ok",
    "unknown_virtual_key",
    "key_inactive",
    "provider_not_allowed",
    "model_not_allowed",
    "rate_limited",
    "budget_exceeded",
]
CheckStatus = Literal[200, 401, 402, 403, 429]
RateHalf = Literal["tokens", "requests"]


class CheckResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The decision of a check, as API.md words it (the route answers it with the
    cache's position: `service.web.answers.CheckAnswer`).

    A blocked answer names the budget or rate limit that blocks; for a rate limit
    `budget_id` is absent and `rate_limit` says which half ("tokens" or "requests"),
    with `current_usage` and `max_limit` in tokens or requests. `held` is what open
    reservations hold on it, when they hold anything: they count toward the block
    but not in `current_usage`.
    """

    allowed: bool
    reason: CheckReason
    http_status: CheckStatus
    budget_id: str | None = None
    owner_type: OwnerType | None = None
    owner_id: str | None = None
    current_usage: Decimal | None = None
    max_limit: Decimal | None = None
    remaining: Decimal | None = None
    rate_limit: RateHalf | None = None
    held: Decimal | None = None


ALLOWED = CheckResult(allowed=True, reason="ok", http_status=200)
UNKNOWN_KEY = CheckResult(allowed=False, reason="unknown_virtual_key", http_status=401)
KEY_INACTIVE = CheckResult(allowed=False, reason="key_inactive", http_status=403)
PROVIDER_NOT_ALLOWED = CheckResult(
    allowed=False, reason="provider_not_allowed", http_status=403
)
MODEL_NOT_ALLOWED = CheckResult(
    allowed=False, reason="model_not_allowed", http_status=403
)


class Owner(msgspec.Struct, gc=False, kw_only=True):
    """Anything that owns budgets and a rate limit, with its cached aggregates
    (the fields a check reads come first: they share the first cache lines)."""

    owner_type: ClassVar[OwnerType]
    left: int = UNLIMITED  # smallest max_limit - used over the budgets, in nanos
    rate_blocked: bool = False  # a rate meter has used >= limit
    # The allowed answer naming `left` as remaining and that amount as a Decimal,
    # made when a check first needs them.
    allowed: CheckResult | None = None
    left_money: Decimal = Decimal(0)
    next_end: datetime = FOREVER  # earliest end of a current period
    id: str
    version: int = 0
    ledger: Ledger  # its budgets and rate-limit halves, folded
    # Open holds (reservations) on this owner: nanos by budget id, and the tokens
    # and requests held against its rate limit.
    held: dict[str, int] | None = None
    held_tokens: int = 0
    held_requests: int = 0


class Hold(msgspec.Struct, gc=False, kw_only=True):
    """An open reservation: what it holds on which owners, until `expires_at`."""

    reservation_id: str
    virtual_key_id: str
    budgets: list[tuple[Owner, str]]  # (owner, budget id) it holds `amount` on
    rate_owners: list[Owner]  # owners whose rate limit it holds tokens + 1 on
    amount: int
    tokens: int
    expires_at: datetime


class Customer(Owner, gc=False, kw_only=True):
    owner_type: ClassVar[OwnerType] = "customer"


class Team(Owner, gc=False, kw_only=True):
    owner_type: ClassVar[OwnerType] = "team"
    customer_id: str | None = None


class ProviderConfigState(Owner, gc=False, kw_only=True):
    """A key's provider config; it holds the chain checks of that provider walk."""

    owner_type: ClassVar[OwnerType] = "provider_config"
    models: frozenset[str] | None = None  # None: every model
    chain: tuple[Owner, ...] = ()  # key, this config, team, customer (those that exist)
    chain_end: datetime = FOREVER  # the earliest next_end in `chain`
    charged: UsageChain | None = None  # `chain` as ingest names it, made on demand
    provider: str


class VirtualKey(Owner, gc=False, kw_only=True):
    """A key; it holds the chain of checks without a provider config."""

    owner_type: ClassVar[OwnerType] = "virtual_key"
    # None: any provider. A tuple, scanned: a key has few configs, and the scan
    # reads the configs (needed anyway) instead of a dict's table besides.
    providers: tuple[ProviderConfigState, ...] | None = None
    is_active: bool = True
    linked: int = -1  # the cache generation `chain` (and its configs') resolved in
    chain: tuple[Owner, ...] = ()  # key, team, customer (those that exist)
    chain_end: datetime = FOREVER  # the earliest next_end in `chain`
    charged: UsageChain | None = None  # `chain` as ingest names it, made on demand
    value_sha256: str
    team_id: str | None = None
    customer_id: str | None = None


Holder = VirtualKey | ProviderConfigState


# --- owners ------------------------------------------------------------------------


def aggregate(owner: Owner) -> None:
    left = UNLIMITED
    next_end = FOREVER
    held = owner.held
    ledger = owner.ledger
    for meter in ledger.budgets:
        headroom = meter.limit - meter.used
        if held:
            headroom -= held.get(meter.id, 0)
        if headroom < left:
            left = headroom
        if meter.end < next_end:
            next_end = meter.end
    rate_blocked = False
    for meter in halves(ledger):
        if meter.used + rate_held(owner, meter) >= meter.limit:
            rate_blocked = True
        if meter.end < next_end:
            next_end = meter.end
    owner.left, owner.rate_blocked, owner.next_end = left, rate_blocked, next_end
    owner.allowed = None


def halves(ledger: Ledger) -> tuple[Meter, ...]:
    """The rate limit's halves that are set: tokens first, then requests."""
    tokens, requests = ledger.tokens, ledger.requests
    if tokens is None:
        return () if requests is None else (requests,)
    return (tokens,) if requests is None else (tokens, requests)


def rate_held(owner: Owner, meter: Meter) -> int:
    return owner.held_tokens if meter.kind == TOKENS else owner.held_requests


def budget_held(owner: Owner, meter: Meter) -> int:
    return owner.held.get(meter.id, 0) if owner.held else 0


def allowed_answer(owner: Owner) -> CheckResult:
    """The allowed answer whose `remaining` is this owner's headroom."""
    money = owner.left_money = to_money(owner.left)
    answer = owner.allowed = CheckResult(
        allowed=True, reason="ok", http_status=200, remaining=money
    )
    return answer


def advance(owner: Owner, now: datetime) -> None:
    """Roll every meter whose period ended by `now`, then refresh the aggregates."""
    fold.advance(owner.ledger, now)
    aggregate(owner)


def advance_chain(holder: Holder, now: datetime) -> None:
    """Roll what ended by `now` in the holder's chain; note the chain's next end."""
    chain_end = FOREVER
    for owner in holder.chain:
        if now >= owner.next_end:
            advance(owner, now)
        if owner.next_end < chain_end:
            chain_end = owner.next_end
    holder.chain_end = chain_end


def unlink(key: VirtualKey) -> None:
    """Drop the key's chains: they hold the key and its configs themselves, a cycle
    the GC would never see (the entries are gc=False); the next check relinks."""
    key.chain = ()
    for config in key.providers or ():
        config.chain = ()
    key.linked = -1


def replace_budgets(owner: Owner, budgets: tuple[Budget, ...], at: datetime) -> None:
    fold.define_budgets(owner.ledger, budgets, at)
    aggregate(owner)


def replace_rate_limit(
    owner: Owner, rate_limit: RateLimit | None, at: datetime
) -> None:
    fold.define_rate_limit(owner.ledger, rate_limit, at)
    aggregate(owner)


def provider_configs(
    current: tuple[ProviderConfigState, ...] | None,
    configs: tuple[ProviderConfig, ...],
    at: datetime,
) -> tuple[ProviderConfigState, ...] | None:
    """A key's provider configs after an event carrying the whole set (by id).

    Provider and model names are interned: every key shares one string per name,
    which stays in the CPU cache when a check compares it.
    """
    by_id = {pc.id: pc for pc in current} if current else {}
    result = []
    for config in configs:
        provider = sys.intern(config.provider)
        models = config.allowed_models
        state = by_id.get(config.provider_config_id)
        if state is None:
            state = ProviderConfigState(
                id=config.provider_config_id, provider=provider, ledger=open_ledger(at)
            )
        state.provider = provider
        state.models = (
            None
            if models is None or "*" in models
            else frozenset(sys.intern(model) for model in models)
        )
        fold.define_budgets(state.ledger, config.budgets, at)
        replace_rate_limit(state, config.rate_limit, at)
        result.append(state)
    return tuple(result) or None


def chain_ids(chain: tuple[Owner, ...]) -> UsageChain:
    ids = {type(owner): owner.id for owner in chain}
    return UsageChain(
        virtual_key_id=ids[VirtualKey],
        provider_config_id=ids.get(ProviderConfigState),
        team_id=ids.get(Team),
        customer_id=ids.get(Customer),
    )


def config_for(
    providers: tuple[ProviderConfigState, ...], provider: str
) -> ProviderConfigState | None:
    for config in providers:
        if config.provider == provider:
            return config
    return None


def rate_limited(owner: Owner) -> CheckResult:
    meter = next(
        m for m in halves(owner.ledger) if m.used + rate_held(owner, m) >= m.limit
    )
    held = rate_held(owner, meter)
    return CheckResult(
        allowed=False,
        reason="rate_limited",
        http_status=429,
        owner_type=owner.owner_type,
        owner_id=owner.id,
        current_usage=Decimal(meter.used),
        max_limit=Decimal(meter.limit),
        rate_limit="tokens" if meter.kind == TOKENS else "requests",
        held=Decimal(held) if held else None,
    )


def budget_exceeded(
    chain: tuple[Owner, ...], estimated_cost: Decimal | None
) -> CheckResult:
    """The answer naming the first budget in chain order that blocks."""
    # Above every limit (< 10^18) the exact size of an estimate no longer matters.
    estimate = 0 if estimated_cost is None else to_nanos(min(estimated_cost, _HUGE))
    owner, meter = next(
        (owner, meter)
        for owner in chain
        for meter in owner.ledger.budgets
        if (taken := meter.used + budget_held(owner, meter)) >= meter.limit
        or estimate > meter.limit - taken
    )
    held = budget_held(owner, meter)
    return CheckResult(
        allowed=False,
        reason="budget_exceeded",
        http_status=402,
        budget_id=meter.id,
        owner_type=owner.owner_type,
        owner_id=owner.id,
        current_usage=to_money(meter.used),
        max_limit=to_money(meter.limit),
        held=to_money(held) if held else None,
    )
