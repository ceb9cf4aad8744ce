"""The answers of the governance API, one struct each: the handlers encode them and the
OpenAPI document describes them. The entities inside are the read views
(`projections.governance_views`), which the read queries fill as well."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

from projections.cache_entries import CheckReason, CheckStatus, RateHalf
from projections.governance_views import (
    BudgetView,
    CustomerView,
    Instant,
    Money,
    OwnerType,
    ProviderConfigView,
    RateLimitView,
    TeamView,
    Uuid,
    VirtualKeyView,
)
from service.records import Envelope

__all__ = [
    "BudgetList",
    "BudgetView",
    "CustomerFound",
    "CustomerList",
    "CustomerSaved",
    "CustomerView",
    "Deleted",
    "Instant",
    "Money",
    "NewVirtualKeyView",
    "OwnerType",
    "Position",
    "ProviderConfigView",
    "RateLimitView",
    "TeamFound",
    "TeamList",
    "TeamSaved",
    "TeamView",
    "Uuid",
    "VirtualKeyFound",
    "VirtualKeyIssued",
    "VirtualKeyList",
    "VirtualKeySaved",
    "VirtualKeyView",
    "encode",
]

Position = Annotated[
    int, msgspec.Meta(ge=0, description="global position in the event log")
]

# Money as JSON numbers, exact: what every answer is encoded with.
encode = msgspec.json.Encoder(decimal_format="number").encode


class NewVirtualKeyView(VirtualKeyView, frozen=True, kw_only=True):
    """A created key: the only answer, with a rotation's, that carries its secret."""

    value: Annotated[str, msgspec.Meta(pattern="^sk-gl-[A-Za-z0-9_-]{32}$")]


# --- commands ----------------------------------------------------------------------


class CustomerSaved(msgspec.Struct, frozen=True, kw_only=True):
    customer: CustomerView
    position: Position


class TeamSaved(msgspec.Struct, frozen=True, kw_only=True):
    team: TeamView
    position: Position


class VirtualKeyIssued(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a created key, with its secret."""

    virtual_key: NewVirtualKeyView
    position: Position


class VirtualKeySaved(msgspec.Struct, frozen=True, kw_only=True):
    virtual_key: VirtualKeyView
    position: Position


class Deleted(msgspec.Struct, frozen=True, kw_only=True):
    position: Position


# --- reads -------------------------------------------------------------------------


class CustomerFound(msgspec.Struct, frozen=True, kw_only=True):
    customer: CustomerView


class CustomerList(msgspec.Struct, frozen=True, kw_only=True):
    customers: list[CustomerView]


class TeamFound(msgspec.Struct, frozen=True, kw_only=True):
    team: TeamView


class TeamList(msgspec.Struct, frozen=True, kw_only=True):
    teams: list[TeamView]


class VirtualKeyFound(msgspec.Struct, frozen=True, kw_only=True):
    virtual_key: VirtualKeyView


class VirtualKeyList(msgspec.Struct, frozen=True, kw_only=True):
    virtual_keys: list[VirtualKeyView]


class BudgetList(msgspec.Struct, frozen=True, kw_only=True):
    budgets: list[BudgetView]


# --- enforcement, usage, the log, operations and errors -----------------------------
# The check's decision is the cache's own `projections.cache_entries.CheckResult`;
# the route maps it onto `CheckAnswer` with the cache's position.


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]*$")]
    message: str


class Error(msgspec.Struct, frozen=True, kw_only=True):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


class CheckAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A blocked answer names the blocking budget or rate limit (`rate_limit` says
    which half, `tokens` or `requests`, and then has no `budget_id`), with `held`
    when open reservations hold part of it; an allowed one carries `remaining`
    whenever the chain has a budget. `position` is the cache's; `stale` is true while
    this replica's cache cannot read the log."""

    allowed: bool
    reason: CheckReason
    http_status: CheckStatus
    budget_id: Uuid | UnsetType = UNSET
    owner_type: OwnerType | UnsetType = UNSET
    owner_id: Uuid | UnsetType = UNSET
    current_usage: Money | UnsetType = UNSET
    max_limit: Money | UnsetType = UNSET
    remaining: Money | UnsetType = UNSET
    rate_limit: RateHalf | UnsetType = UNSET
    held: Money | UnsetType = UNSET
    position: Position
    stale: bool | UnsetType = UNSET
    # A reserving check that was allowed: the hold, and when it lapses by itself.
    reservation_id: Uuid | UnsetType = UNSET
    expires_at: Instant | UnsetType = UNSET


class Released(msgspec.Struct, frozen=True, kw_only=True):
    """The position of the release (or, when nothing was open, the cache's)."""

    position: Position


class UsageAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """A repeat of an `event_id` is acknowledged as a duplicate and counted once."""

    position: Position
    duplicate: bool


class RejectedLine(msgspec.Struct, frozen=True, kw_only=True):
    line: Annotated[int, msgspec.Meta(ge=1)]
    code: str
    message: str


class BatchAnswer(msgspec.Struct, frozen=True, kw_only=True):
    accepted: int
    duplicates: int
    rejected: list[RejectedLine]
    position: Position


class RejectedElement(msgspec.Struct, frozen=True, kw_only=True):
    index: Annotated[int, msgspec.Meta(ge=0)]
    code: str
    message: str


class UsageFrameAck(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to one frame, sent after its records committed."""

    seq: int
    accepted: int
    duplicates: int
    rejected: list[RejectedElement]
    position: Position


class UsageFrameError(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a frame that is not `{seq, records}` (`seq` when it has one)."""

    seq: int | UnsetType = UNSET
    error: ErrorDetail


class EventPage(msgspec.Struct, frozen=True, kw_only=True):
    """`next_after` is the `after` of the next page."""

    events: list[Envelope]
    next_after: Position


class BudgetPeriod(msgspec.Struct, frozen=True, kw_only=True):
    """The spend of one period; after an explicit reset a period shows as two."""

    period_start: Instant
    spend: Money


class BudgetPeriods(msgspec.Struct, frozen=True, kw_only=True):
    """Oldest first."""

    periods: list[BudgetPeriod]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok"]


class ProjectionFailure(msgspec.Struct, frozen=True, kw_only=True):
    """A projection stuck on the event at `position`: retried, never skipped."""

    projection: str
    position: int
    error: str


class RefusedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A legacy event in the log with no current form, passed over by every
    projection alike (its owner's commands answer 400 legacy_event_refused)."""

    position: int
    event_id: str
    stream_id: str
    type: str
    schema_version: int
    code: str
    message: str


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    """`pending` names the projections still catching up; `failing` those stuck on
    an event (status `degraded`: still 200, the rest of the service works);
    `refused` the legacy events every projection passed over."""

    status: Literal["ready", "starting", "catching_up", "degraded"]
    pending: list[str] | UnsetType = UNSET
    failing: list[ProjectionFailure] | UnsetType = UNSET
    refused: list[RefusedEvent] | UnsetType = UNSET
