"""The governance entities as the API shows them: customers, teams and virtual keys
with their budgets, rate limits and provider configs, each limit with its current usage.

Pure structs, one per shape: the read queries (`projections.governance_reads`) fill
them from the read model, the command answers from a folded stream; the web layer's
answers (`service.web.answers`) wrap them and the OpenAPI document describes them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

Uuid = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
# msgspec describes a Decimal as a "decimal" string; the OpenAPI document turns one
# marked x-number into a plain JSON number, which is what the encoder writes.
Money = Annotated[Decimal, msgspec.Meta(extra_json_schema={"x-number": True})]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]
OwnerType = Literal["customer", "team", "virtual_key", "provider_config"]


class BudgetView(msgspec.Struct, frozen=True, kw_only=True):
    """A budget with its spend in the current period (`last_reset` is its start)."""

    id: Uuid
    max_limit: Money
    reset_duration: str
    calendar_aligned: bool
    current_usage: Money
    last_reset: Instant
    owner_type: OwnerType
    owner_id: Uuid
    # What open holds (reservations) on this budget reserve; spend is current_usage.
    held: Money = Decimal(0)


class RateLimitView(msgspec.Struct, frozen=True, kw_only=True):
    """Token and request limits with their use in the current window."""

    token_max_limit: int | None
    token_reset_duration: str | None
    request_max_limit: int | None
    request_reset_duration: str | None
    token_current_usage: int
    request_current_usage: int
    # What open holds reserve: their estimated tokens, and one request each.
    token_held: int = 0
    request_held: int = 0


class ProviderConfigView(msgspec.Struct, frozen=True, kw_only=True):
    """`allowed_models` is `["*"]` for every model, `[]` for none."""

    id: Uuid
    provider: str
    allowed_models: list[str]
    budgets: list[BudgetView]
    rate_limit: RateLimitView | None


class CustomerView(msgspec.Struct, frozen=True, kw_only=True):
    id: Uuid
    name: str
    budgets: list[BudgetView]
    rate_limit: RateLimitView | None
    version: int
    created_at: Instant
    updated_at: Instant


class TeamView(msgspec.Struct, frozen=True, kw_only=True):
    id: Uuid
    name: str
    customer_id: Uuid | None
    budgets: list[BudgetView]
    rate_limit: RateLimitView | None
    version: int
    created_at: Instant
    updated_at: Instant


class VirtualKeyView(msgspec.Struct, frozen=True, kw_only=True):
    """`value`, the secret, is only in the answer of a PUT with `rotate_value`."""

    id: Uuid
    name: str
    team_id: Uuid | None
    customer_id: Uuid | None
    is_active: bool
    budgets: list[BudgetView]
    rate_limit: RateLimitView | None
    provider_configs: list[ProviderConfigView]
    value_hint: str
    version: int
    created_at: Instant
    updated_at: Instant
    value: str | UnsetType = UNSET
