"""Governance request bodies (strict), the commands built from them, and the checks
the customer, team and virtual-key decisions share."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
from msgspec import UNSET, UnsetType

from service.domain.budgets import BudgetSpec, reconcile, validate_rate_limit
from service.domain.events import Budget, RateLimit
from service.errors import Invalid, UnknownReference

# --- request bodies ----------------------------------------------------------------


class RateLimitSpec(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A rate limit as a request asks for it: each limit (> 0) needs its duration."""

    token_max_limit: int | None = None
    token_reset_duration: str | None = None
    request_max_limit: int | None = None
    request_reset_duration: str | None = None


class ProviderConfigSpec(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A virtual key's settings for one provider, described in full.

    `allowed_models` omitted, null or containing "*" allows every model; `[]` none.
    Omitted `budgets` or `rate_limit` mean none: the entry replaces the config.
    """

    provider: str
    allowed_models: tuple[str, ...] | None = None
    budgets: tuple[BudgetSpec, ...] = ()
    rate_limit: RateLimitSpec | None = None


class CustomerBody(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of POST /api/governance/customers."""

    name: str
    budgets: tuple[BudgetSpec, ...] = ()
    rate_limit: RateLimitSpec | None = None


class CustomerChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/customers/{id}: an omitted field is unchanged.

    `budgets` is the full resulting set (`[]` removes all); `rate_limit: null`
    removes the rate limit.
    """

    name: str | UnsetType = UNSET
    budgets: tuple[BudgetSpec, ...] | UnsetType = UNSET
    rate_limit: RateLimitSpec | UnsetType | None = UNSET


class TeamBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/governance/teams."""

    name: str
    customer_id: str | None = None
    budgets: tuple[BudgetSpec, ...] = ()
    rate_limit: RateLimitSpec | None = None


class TeamChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/teams/{id}: an omitted field is unchanged.

    `customer_id: null` detaches the team; `budgets` is the full resulting set.
    """

    name: str | UnsetType = UNSET
    customer_id: str | UnsetType | None = UNSET
    budgets: tuple[BudgetSpec, ...] | UnsetType = UNSET
    rate_limit: RateLimitSpec | UnsetType | None = UNSET


class VirtualKeyBody(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of POST /api/governance/virtual-keys: a key under a team or a customer,
    never both."""

    name: str
    team_id: str | None = None
    customer_id: str | None = None
    is_active: bool = True
    budgets: tuple[BudgetSpec, ...] = ()
    rate_limit: RateLimitSpec | None = None
    provider_configs: tuple[ProviderConfigSpec, ...] = ()


class VirtualKeyChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/virtual-keys/{id}: an omitted field is unchanged.

    `provider_configs` is the full resulting set, reconciled by `provider`;
    `rotate_value: true` issues a new secret, returned once in the answer.
    """

    name: str | UnsetType = UNSET
    team_id: str | UnsetType | None = UNSET
    customer_id: str | UnsetType | None = UNSET
    is_active: bool | UnsetType = UNSET
    budgets: tuple[BudgetSpec, ...] | UnsetType = UNSET
    rate_limit: RateLimitSpec | UnsetType | None = UNSET
    provider_configs: tuple[ProviderConfigSpec, ...] | UnsetType = UNSET
    rotate_value: bool = False


# --- commands ----------------------------------------------------------------------
# `new_ids` are ids drawn in the shell for whatever the decision creates (budgets,
# provider configs), used in order; `ids_needed` says how many a body can use.
# `unknown_references` are the customer/team ids the body names that the shell did
# not find.


class KeyDigest(msgspec.Struct, frozen=True, kw_only=True):
    """What is kept of a virtual key's secret: its hex SHA-256 and last 4 characters."""

    sha256: str
    hint: str


class CreateCustomer(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    body: CustomerBody
    new_ids: tuple[str, ...] = ()


class UpdateCustomer(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    changes: CustomerChanges
    new_ids: tuple[str, ...] = ()


class DeleteCustomer(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str


class CreateTeam(msgspec.Struct, frozen=True, kw_only=True):
    team_id: str
    body: TeamBody
    new_ids: tuple[str, ...] = ()
    unknown_references: frozenset[str] = frozenset()


class UpdateTeam(msgspec.Struct, frozen=True, kw_only=True):
    team_id: str
    changes: TeamChanges
    new_ids: tuple[str, ...] = ()
    unknown_references: frozenset[str] = frozenset()


class DeleteTeam(msgspec.Struct, frozen=True, kw_only=True):
    team_id: str


class DetachTeam(msgspec.Struct, frozen=True, kw_only=True):
    """Part of deleting a customer: the team leaves it, if it still belongs to it."""

    team_id: str
    customer_id: str


class CreateVirtualKey(msgspec.Struct, frozen=True, kw_only=True):
    virtual_key_id: str
    body: VirtualKeyBody
    value: KeyDigest
    new_ids: tuple[str, ...] = ()
    unknown_references: frozenset[str] = frozenset()


class UpdateVirtualKey(msgspec.Struct, frozen=True, kw_only=True):
    """`new_value` is set exactly when the changes ask to rotate the secret."""

    virtual_key_id: str
    changes: VirtualKeyChanges
    new_value: KeyDigest | None = None
    new_ids: tuple[str, ...] = ()
    unknown_references: frozenset[str] = frozenset()


class DeleteVirtualKey(msgspec.Struct, frozen=True, kw_only=True):
    virtual_key_id: str


class DetachVirtualKey(msgspec.Struct, frozen=True, kw_only=True):
    """Part of deleting a team or customer: the key leaves the one named here."""

    virtual_key_id: str
    team_id: str | None = None
    customer_id: str | None = None


AnyBody = (
    CustomerBody
    | CustomerChanges
    | TeamBody
    | TeamChanges
    | VirtualKeyBody
    | VirtualKeyChanges
)


def ids_needed(body: AnyBody) -> int:
    """The most new ids a command built from `body` can draw."""
    budgets = () if isinstance(body.budgets, UnsetType) else body.budgets
    configs: Iterable[ProviderConfigSpec] = ()
    if isinstance(body, VirtualKeyBody | VirtualKeyChanges) and not isinstance(
        body.provider_configs, UnsetType
    ):
        configs = body.provider_configs
    return len(budgets) + sum(1 + len(c.budgets) for c in configs)


# --- checks shared by the aggregates ----------------------------------------------


def id_source(ids: tuple[str, ...]) -> Callable[[], str]:
    """The next of the pre-drawn ids at each call."""
    remaining = iter(ids)

    def new_id() -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise ValueError("the command carries too few new ids") from None

    return new_id


def checked_name(name: str, what: str) -> str:
    if not name.strip():
        raise Invalid(f"the {what} needs a non-empty name")
    return name


def checked_reference(
    reference: str | None, what: str, unknown: frozenset[str]
) -> str | None:
    if reference is not None and reference in unknown:
        raise UnknownReference(f"{what} {reference} does not exist")
    return reference


def rate_limit_of(spec: RateLimitSpec | None) -> RateLimit | None:
    """The validated rate limit a spec asks for; None when it sets no limit."""
    if spec is None:
        return None
    rate_limit = validate_rate_limit(
        RateLimit(
            token_max_limit=spec.token_max_limit,
            token_reset_duration=spec.token_reset_duration,
            request_max_limit=spec.request_max_limit,
            request_reset_duration=spec.request_reset_duration,
        )
    )
    return None if rate_limit == RateLimit() else rate_limit


def settled(budgets: Iterable[Budget]) -> tuple[Budget, ...]:
    """Budgets as state keeps them: `reset_usage` marks an event, not a budget."""
    return tuple(
        msgspec.structs.replace(b, reset_usage=False) if b.reset_usage else b
        for b in budgets
    )


def same_budgets(a: Iterable[Budget], b: Iterable[Budget]) -> bool:
    """Equal sets of budgets, whatever their order."""
    return sorted(a, key=_by_duration) == sorted(b, key=_by_duration)


def _by_duration(budget: Budget) -> str:
    return budget.reset_duration


def replaced_budgets(
    current: tuple[Budget, ...],
    requested: tuple[BudgetSpec, ...] | UnsetType,
    new_id: Callable[[], str],
) -> tuple[Budget, ...] | None:
    """The owner's budgets after a PUT; None when it leaves them as they are."""
    if isinstance(requested, UnsetType):
        return None
    budgets = reconcile(current, requested, new_id)
    return None if same_budgets(budgets, current) else budgets
