"""Every event of the log as a frozen, tagged msgspec struct; the tag is `type`.

Events are never `forbid_unknown_fields`: old code must read events written by new code.
Fields added later always get a default. Money is `Decimal`, stored as a decimal string.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar, get_args

import msgspec


class Event(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every event; the tag (class name) is the `type` column."""

    schema_version: ClassVar[int] = 1


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """One budget as events carry it; `reset_usage` marks an explicit reset."""

    budget_id: str
    max_limit: Decimal
    reset_duration: str
    calendar_aligned: bool = False
    reset_usage: bool = False


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    token_max_limit: int | None = None
    token_reset_duration: str | None = None
    request_max_limit: int | None = None
    request_reset_duration: str | None = None


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A virtual key's settings for one provider; `allowed_models` None means all."""

    provider_config_id: str
    provider: str
    allowed_models: tuple[str, ...] | None = None
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None


# --- customers ---------------------------------------------------------------------


class CustomerCreated(Event, frozen=True, kw_only=True):
    schema_version: ClassVar[int] = 2
    customer_id: str
    name: str
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None


class CustomerUpdated(Event, frozen=True, kw_only=True):
    """The customer's resulting name and rate limit."""

    customer_id: str
    name: str
    rate_limit: RateLimit | None = None


class CustomerBudgetsReplaced(Event, frozen=True, kw_only=True):
    """The whole resulting set of the customer's budgets."""

    customer_id: str
    budgets: tuple[Budget, ...] = ()


class CustomerDeleted(Event, frozen=True, kw_only=True):
    customer_id: str


# --- teams -------------------------------------------------------------------------


class TeamCreated(Event, frozen=True, kw_only=True):
    schema_version: ClassVar[int] = 2
    team_id: str
    name: str
    customer_id: str | None = None
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None


class TeamUpdated(Event, frozen=True, kw_only=True):
    """The team's resulting name, customer and rate limit."""

    team_id: str
    name: str
    customer_id: str | None = None
    rate_limit: RateLimit | None = None


class TeamBudgetsReplaced(Event, frozen=True, kw_only=True):
    team_id: str
    budgets: tuple[Budget, ...] = ()


class TeamDeleted(Event, frozen=True, kw_only=True):
    team_id: str


# --- virtual keys ------------------------------------------------------------------


class VirtualKeyCreated(Event, frozen=True, kw_only=True):
    """`value_sha256` is the hex SHA-256 of the secret; the secret is never stored."""

    schema_version: ClassVar[int] = 2
    virtual_key_id: str
    name: str
    value_sha256: str
    value_hint: str
    team_id: str | None = None
    customer_id: str | None = None
    is_active: bool = True
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None
    provider_configs: tuple[ProviderConfig, ...] = ()


class VirtualKeyUpdated(Event, frozen=True, kw_only=True):
    """The key's resulting fields but its own budgets (provider configs included)."""

    virtual_key_id: str
    name: str
    value_sha256: str
    value_hint: str
    team_id: str | None = None
    customer_id: str | None = None
    is_active: bool = True
    rate_limit: RateLimit | None = None
    provider_configs: tuple[ProviderConfig, ...] = ()


class VirtualKeyBudgetsReplaced(Event, frozen=True, kw_only=True):
    virtual_key_id: str
    budgets: tuple[Budget, ...] = ()


class VirtualKeyDeleted(Event, frozen=True, kw_only=True):
    virtual_key_id: str


# --- usage -------------------------------------------------------------------------


class UsageRecorded(Event, frozen=True, kw_only=True):
    """Spend on one request, with the chain it was charged to when it was accepted."""

    virtual_key_id: str
    provider: str
    model: str
    cost: Decimal
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 1
    occurred_at: datetime
    provider_config_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    # The hold this spend settles (the first record naming an open hold of its key).
    reservation_id: str | None = None


class UsageCharge(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A UsageRecorded as the folds decode a stored one in bulk: the same fields and
    types, a plain struct (no tag, not tracked by the garbage collector)."""

    virtual_key_id: str
    provider: str  # not folded; required, so a row decodes here exactly when it
    model: str  # decodes as a UsageRecorded
    cost: Decimal
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 1
    occurred_at: datetime
    provider_config_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    reservation_id: str | None = None


class ReservationHeld(Event, frozen=True, kw_only=True):
    """An estimate held on the budgets and rate limits of a key's chain until the
    first of: a usage record naming it, a release, `expires_at` (in the key's usage
    stream). The hold stays on the budgets it was decided on."""

    reservation_id: str
    virtual_key_id: str
    provider_config_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    budget_ids: tuple[str, ...] = ()  # every budget of the chain when decided
    rate_owner_ids: tuple[str, ...] = ()  # owners whose rate limit it holds on
    amount: Decimal
    tokens: int = 0
    expires_at: datetime


class ReservationReleased(Event, frozen=True, kw_only=True):
    """A hold dropped without spend (the call failed or was abandoned)."""

    reservation_id: str
    virtual_key_id: str


CustomerEvent = (
    CustomerCreated | CustomerUpdated | CustomerBudgetsReplaced | CustomerDeleted
)
TeamEvent = TeamCreated | TeamUpdated | TeamBudgetsReplaced | TeamDeleted
VirtualKeyEvent = (
    VirtualKeyCreated
    | VirtualKeyUpdated
    | VirtualKeyBudgetsReplaced
    | VirtualKeyDeleted
)
ReservationEvent = ReservationHeld | ReservationReleased
AnyEvent = (
    CustomerEvent | TeamEvent | VirtualKeyEvent | UsageRecorded | ReservationEvent
)

EVENT_TYPES: dict[str, type[AnyEvent]] = {
    t.__struct_config__.tag: t for t in get_args(AnyEvent)
}

STREAM_PREFIXES = ("customer", "team", "virtual_key", "usage")


def type_name(event: AnyEvent) -> str:
    """The wire name of an event (its tag)."""
    return type(event).__struct_config__.tag  # type: ignore[return-value]
