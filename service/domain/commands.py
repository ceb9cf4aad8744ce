"""Governance request bodies (strict, bounded), the commands built from them, and the
checks the customer, team and virtual-key decisions share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from service.domain.bounds import (
    MAX_PROVIDER_CONFIGS,
    Budgets,
    Id,
    Models,
    Name,
    RateLimitValue,
    canonical_id,
    explained,
)
from service.domain.budgets import (
    BudgetSpec,
    ResetDuration,
    reconcile,
    validate_rate_limit,
)
from service.domain.events import Budget, RateLimit
from service.domain.numbers import decimal_number, decode_hook
from service.errors import Invalid, UnknownReference

# --- request bodies ----------------------------------------------------------------
# In a PUT an omitted field (UNSET) keeps its value at every depth and null removes
# it; in a POST an omitted field takes its default (docs/API.md, "Partial updates").


class RateLimitSpec(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A rate limit as a create asks for it: each limit (> 0) needs its duration,
    each duration its limit (bounds.RATE_LIMIT_PAIRS)."""

    token_max_limit: RateLimitValue | None = None
    token_reset_duration: ResetDuration | None = None
    request_max_limit: RateLimitValue | None = None
    request_reset_duration: ResetDuration | None = None


class RateLimitChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A rate limit in a PUT: a field not sent keeps its value, so a half that is
    not named is kept; a limit set to null removes its half, duration included."""

    token_max_limit: RateLimitValue | UnsetType | None = UNSET
    token_reset_duration: ResetDuration | UnsetType | None = UNSET
    request_max_limit: RateLimitValue | UnsetType | None = UNSET
    request_reset_duration: ResetDuration | UnsetType | None = UNSET


class ProviderConfigSpec(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A virtual key's settings for one provider, as a create asks for them.

    `allowed_models` omitted, null or containing "*" allows every model; `[]` none.
    """

    provider: Name
    allowed_models: Models | None = None
    budgets: Budgets = ()
    rate_limit: RateLimitSpec | None = None


class ProviderConfigChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """A provider's settings in a PUT. For a provider the key has, an omitted
    `allowed_models`, `budgets` or `rate_limit` keeps its value (budgets with their
    usage); for a new one it takes the create's default (every model, none, none).
    Null removes: `budgets: null` is `[]`, `allowed_models: null` allows every model
    (as an omitted list does in a create), `rate_limit: null` drops the limit.
    """

    provider: Name
    allowed_models: Models | UnsetType | None = UNSET
    budgets: Budgets | UnsetType | None = UNSET
    rate_limit: RateLimitChanges | UnsetType | None = UNSET


AnyProviderConfig = ProviderConfigSpec | ProviderConfigChanges


class CustomerBody(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of POST /api/governance/customers."""

    name: Name
    budgets: Budgets = ()
    rate_limit: RateLimitSpec | None = None


class CustomerChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/customers/{id}: an omitted field is unchanged.

    `budgets` is the full resulting set (`[]` or null removes all); `rate_limit:
    null` removes the rate limit.
    """

    name: Name | UnsetType = UNSET
    budgets: Budgets | UnsetType | None = UNSET
    rate_limit: RateLimitChanges | UnsetType | None = UNSET


class TeamBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/governance/teams."""

    name: Name
    customer_id: Id | None = None
    budgets: Budgets = ()
    rate_limit: RateLimitSpec | None = None


class TeamChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/teams/{id}: an omitted field is unchanged.

    `customer_id: null` detaches the team; `budgets` is the full resulting set
    (`[]` or null removes all); `rate_limit: null` removes the rate limit.
    """

    name: Name | UnsetType = UNSET
    customer_id: Id | UnsetType | None = UNSET
    budgets: Budgets | UnsetType | None = UNSET
    rate_limit: RateLimitChanges | UnsetType | None = UNSET


class VirtualKeyBody(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of POST /api/governance/virtual-keys: a key under a team or a customer,
    never both."""

    name: Name
    team_id: Id | None = None
    customer_id: Id | None = None
    is_active: bool = True
    budgets: Budgets = ()
    rate_limit: RateLimitSpec | None = None
    provider_configs: Annotated[
        tuple[ProviderConfigSpec, ...], msgspec.Meta(max_length=MAX_PROVIDER_CONFIGS)
    ] = ()


class VirtualKeyChanges(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Body of PUT /api/governance/virtual-keys/{id}: an omitted field is unchanged.

    `budgets` and `provider_configs` are the full resulting sets (`[]` or null
    removes all), provider configs reconciled by `provider`; `rotate_value: true`
    issues a new secret, returned once in the answer.
    """

    name: Name | UnsetType = UNSET
    team_id: Id | UnsetType | None = UNSET
    customer_id: Id | UnsetType | None = UNSET
    is_active: bool | UnsetType = UNSET
    budgets: Budgets | UnsetType | None = UNSET
    rate_limit: RateLimitChanges | UnsetType | None = UNSET
    provider_configs: (
        Annotated[
            tuple[ProviderConfigChanges, ...],
            msgspec.Meta(max_length=MAX_PROVIDER_CONFIGS),
        ]
        | UnsetType
        | None
    ) = UNSET
    rotate_value: bool = False


AnyBody = (
    CustomerBody
    | CustomerChanges
    | TeamBody
    | TeamChanges
    | VirtualKeyBody
    | VirtualKeyChanges
)


B = TypeVar("B", bound=AnyBody)


def body_decoder(type_: type[B]) -> msgspec.json.Decoder[B]:
    """The strict decoder of a body: money exact (see budgets.Money)."""
    return msgspec.json.Decoder(type_, dec_hook=decode_hook, float_hook=decimal_number)


T = TypeVar("T")


def strict_decode(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    """Decode a request body; every failure is an Invalid naming the JSON path."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise Invalid(f"the request body is invalid: {explained(exc)}") from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec's error for bad UTF-8 in a string
        raise Invalid(f"the request body is not valid UTF-8: {exc}") from None


def canonical_references(body: B) -> B:
    """The body with the customer and team ids it names in their stored spelling."""
    references = {
        name: canonical_id(value)
        for name in ("team_id", "customer_id")
        if isinstance(value := getattr(body, name, None), str)
    }
    return msgspec.structs.replace(body, **references) if references else body


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


def ids_needed(body: AnyBody) -> int:
    """The most new ids a command built from `body` can draw."""
    configs: Iterable[AnyProviderConfig] = ()
    if isinstance(body, VirtualKeyBody | VirtualKeyChanges) and not isinstance(
        body.provider_configs, UnsetType
    ):
        configs = body.provider_configs or ()
    return _count(body.budgets) + sum(1 + _count(c.budgets) for c in configs)


def _count(budgets: tuple[BudgetSpec, ...] | UnsetType | None) -> int:
    return 0 if isinstance(budgets, UnsetType) else len(budgets or ())


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
    """The validated rate limit a create asks for; None when it sets no limit."""
    return rate_limit_after(None, spec)


def rate_limit_after(
    current: RateLimit | None,
    requested: RateLimitSpec | RateLimitChanges | UnsetType | None,
) -> RateLimit | None:
    """The validated rate limit once `requested` is applied to `current`: UNSET keeps
    it, null removes it, and each half not named in `requested` is kept (a limit set
    to null drops its half). None when no limit remains."""
    if isinstance(requested, UnsetType):
        return current
    if requested is None:
        return None
    base = current or RateLimit()
    token_max_limit, token_reset_duration = _half(
        (base.token_max_limit, base.token_reset_duration),
        (requested.token_max_limit, requested.token_reset_duration),
    )
    request_max_limit, request_reset_duration = _half(
        (base.request_max_limit, base.request_reset_duration),
        (requested.request_max_limit, requested.request_reset_duration),
    )
    rate_limit = validate_rate_limit(
        RateLimit(
            token_max_limit=token_max_limit,
            token_reset_duration=token_reset_duration,
            request_max_limit=request_max_limit,
            request_reset_duration=request_reset_duration,
        )
    )
    return None if rate_limit == RateLimit() else rate_limit


def _half(
    current: tuple[int | None, str | None],
    requested: tuple[int | UnsetType | None, str | UnsetType | None],
) -> tuple[int | None, str | None]:
    (limit, duration), (new_limit, new_duration) = current, requested
    if not isinstance(new_limit, UnsetType):
        limit = new_limit
        if new_limit is None and isinstance(new_duration, UnsetType):
            duration = None  # the half goes with its limit
    if not isinstance(new_duration, UnsetType):
        duration = new_duration
    return limit, duration


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
    requested: tuple[BudgetSpec, ...] | UnsetType | None,
    new_id: Callable[[], str],
) -> tuple[Budget, ...] | None:
    """The owner's budgets after a PUT (UNSET keeps them, null removes them all, as
    `[]` does); None when it leaves them as they are."""
    if isinstance(requested, UnsetType):
        return None
    budgets = reconcile(current, requested or (), new_id)
    return None if same_budgets(budgets, current) else budgets
