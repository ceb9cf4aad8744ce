"""The virtual-key aggregate: its state, how events change it, what commands decide,
and the reconciliation of provider configs by provider."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import reduce
from typing import assert_never

import msgspec

from service.domain.budgets import new_budgets, reconcile
from service.domain.commands import (
    AnyProviderConfig,
    CreateVirtualKey,
    DeleteVirtualKey,
    DetachVirtualKey,
    UpdateVirtualKey,
    checked_name,
    checked_reference,
    id_source,
    rate_limit_after,
    rate_limit_of,
    replaced_budgets,
    same_budgets,
    settled,
)
from service.domain.events import (
    AnyEvent,
    Budget,
    ProviderConfig,
    RateLimit,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyDeleted,
    VirtualKeyEvent,
    VirtualKeyUpdated,
)
from service.errors import (
    ConflictingOwner,
    DuplicateProvider,
    Invalid,
    NotFound,
    VersionConflict,
)

VirtualKeyCommand = (
    CreateVirtualKey | UpdateVirtualKey | DeleteVirtualKey | DetachVirtualKey
)


class VirtualKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    value_sha256: str
    value_hint: str
    team_id: str | None = None
    customer_id: str | None = None
    is_active: bool = True
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None
    provider_configs: tuple[ProviderConfig, ...] = ()


def evolve(key: VirtualKey | None, event: AnyEvent) -> VirtualKey | None:
    """The key after `event`; events of other aggregates leave it as it is."""
    match event:
        case VirtualKeyCreated():
            return VirtualKey(
                id=event.virtual_key_id,
                name=event.name,
                value_sha256=event.value_sha256,
                value_hint=event.value_hint,
                team_id=event.team_id,
                customer_id=event.customer_id,
                is_active=event.is_active,
                budgets=settled(event.budgets),
                rate_limit=event.rate_limit,
                provider_configs=_settled_configs(event.provider_configs),
            )
        case VirtualKeyUpdated() if key is not None:
            return msgspec.structs.replace(
                key,
                name=event.name,
                value_sha256=event.value_sha256,
                value_hint=event.value_hint,
                team_id=event.team_id,
                customer_id=event.customer_id,
                is_active=event.is_active,
                rate_limit=event.rate_limit,
                provider_configs=_settled_configs(event.provider_configs),
            )
        case VirtualKeyBudgetsReplaced() if key is not None:
            return msgspec.structs.replace(key, budgets=settled(event.budgets))
        case VirtualKeyDeleted():
            return None
        case _:
            return key


def fold(events: Iterable[AnyEvent]) -> VirtualKey | None:
    return reduce(evolve, events, None)


def decide(command: VirtualKeyCommand, key: VirtualKey | None) -> list[VirtualKeyEvent]:
    match command:
        case CreateVirtualKey(virtual_key_id=key_id, body=body):
            if key is not None:
                raise VersionConflict(f"virtual key {key_id} already exists")
            team_id, customer_id = _owner(
                body.team_id, body.customer_id, command.unknown_references
            )
            new_id = id_source(command.new_ids)
            return [
                VirtualKeyCreated(
                    virtual_key_id=key_id,
                    name=checked_name(body.name, "virtual key"),
                    value_sha256=command.value.sha256,
                    value_hint=command.value.hint,
                    team_id=team_id,
                    customer_id=customer_id,
                    is_active=body.is_active,
                    rate_limit=rate_limit_of(body.rate_limit),
                    budgets=new_budgets(body.budgets, new_id),
                    provider_configs=reconcile_provider_configs(
                        (), body.provider_configs, new_id
                    ),
                )
            ]
        case UpdateVirtualKey(virtual_key_id=key_id):
            if key is None:
                raise NotFound(f"virtual key {key_id} does not exist")
            return _updated(key, command)
        case DeleteVirtualKey(virtual_key_id=key_id):
            if key is None:
                raise NotFound(f"virtual key {key_id} does not exist")
            return [VirtualKeyDeleted(virtual_key_id=key_id)]
        case DetachVirtualKey():
            if key is None:
                return []
            detached = msgspec.structs.replace(
                key,
                team_id=None if key.team_id == command.team_id else key.team_id,
                customer_id=(
                    None if key.customer_id == command.customer_id else key.customer_id
                ),
            )
            return [] if detached == key else [_update_event(detached)]
        case _:
            assert_never(command)


def _updated(key: VirtualKey, command: UpdateVirtualKey) -> list[VirtualKeyEvent]:
    changes = command.changes
    unset = msgspec.UnsetType
    team_id, customer_id = _owner(
        key.team_id if isinstance(changes.team_id, unset) else changes.team_id,
        key.customer_id
        if isinstance(changes.customer_id, unset)
        else changes.customer_id,
        command.unknown_references,
    )
    new_id = id_source(command.new_ids)
    after = msgspec.structs.replace(
        key,
        name=(
            key.name
            if isinstance(changes.name, unset)
            else checked_name(changes.name, "virtual key")
        ),
        team_id=team_id,
        customer_id=customer_id,
        is_active=(
            key.is_active if isinstance(changes.is_active, unset) else changes.is_active
        ),
        rate_limit=rate_limit_after(key.rate_limit, changes.rate_limit),
        provider_configs=(
            key.provider_configs
            if isinstance(changes.provider_configs, unset)
            else reconcile_provider_configs(  # null removes them all, as [] does
                key.provider_configs, changes.provider_configs or (), new_id
            )
        ),
    )
    if command.new_value is not None:
        after = msgspec.structs.replace(
            after,
            value_sha256=command.new_value.sha256,
            value_hint=command.new_value.hint,
        )
    budgets = replaced_budgets(key.budgets, changes.budgets, new_id)
    events: list[VirtualKeyEvent] = []
    if not _same_key(after, key):
        events.append(_update_event(after))
    if budgets is not None:
        events.append(VirtualKeyBudgetsReplaced(virtual_key_id=key.id, budgets=budgets))
    return events


def _owner(
    team_id: str | None, customer_id: str | None, unknown: frozenset[str]
) -> tuple[str | None, str | None]:
    if team_id is not None and customer_id is not None:
        raise ConflictingOwner(
            "a virtual key belongs to a team or to a customer, not both:"
            f" got team_id {team_id} and customer_id {customer_id}"
        )
    return (
        checked_reference(team_id, "team", unknown),
        checked_reference(customer_id, "customer", unknown),
    )


def _update_event(key: VirtualKey) -> VirtualKeyUpdated:
    return VirtualKeyUpdated(
        virtual_key_id=key.id,
        name=key.name,
        value_sha256=key.value_sha256,
        value_hint=key.value_hint,
        team_id=key.team_id,
        customer_id=key.customer_id,
        is_active=key.is_active,
        rate_limit=key.rate_limit,
        provider_configs=key.provider_configs,
    )


def _same_key(a: VirtualKey, b: VirtualKey) -> bool:
    """Equal but for the order of provider configs and of their budgets."""
    if msgspec.structs.replace(a, provider_configs=()) != msgspec.structs.replace(
        b, provider_configs=()
    ):
        return False
    configs_a = {c.provider: c for c in a.provider_configs}
    configs_b = {c.provider: c for c in b.provider_configs}
    return configs_a.keys() == configs_b.keys() and all(
        msgspec.structs.replace(c, budgets=())
        == msgspec.structs.replace(configs_b[p], budgets=())
        and same_budgets(c.budgets, configs_b[p].budgets)
        for p, c in configs_a.items()
    )


# --- provider configs --------------------------------------------------------------


def reconcile_provider_configs(
    current: tuple[ProviderConfig, ...],
    requested: Iterable[AnyProviderConfig],
    new_id: Callable[[], str],
) -> tuple[ProviderConfig, ...]:
    """A key's provider configs after a request replaces the whole set.

    A kept provider keeps its provider_config_id, reconciles its budgets by
    reset_duration and keeps whatever the entry leaves out (UNSET): its allowed
    models, its budgets with their usage, each half of its rate limit; null removes
    (budgets: all of them, as `[]` does; allowed_models: the restriction, so every
    model). A new provider gets `new_id()` and the defaults (every model, no budget,
    no rate limit); a dropped one is gone.
    """
    by_provider = {config.provider: config for config in current}
    seen: set[str] = set()
    configs: list[ProviderConfig] = []
    for spec in requested:
        if not spec.provider.strip():
            raise Invalid("a provider config needs a non-empty provider")
        if spec.provider in seen:
            raise DuplicateProvider(
                f"provider_configs name provider {spec.provider!r} more than once;"
                " a virtual key has at most one config per provider"
            )
        seen.add(spec.provider)
        kept = by_provider.get(spec.provider)
        # A new provider starts from the defaults: every model, nothing else.
        before = kept or ProviderConfig(provider_config_id="", provider=spec.provider)
        rate_limit = rate_limit_after(before.rate_limit, spec.rate_limit)
        allowed_models = before.allowed_models
        if not isinstance(spec.allowed_models, msgspec.UnsetType):
            allowed_models = _allowed_models(spec.allowed_models)
        config_id = new_id() if kept is None else kept.provider_config_id
        budgets = before.budgets
        if not isinstance(spec.budgets, msgspec.UnsetType):
            budgets = reconcile(before.budgets, spec.budgets or (), new_id)
        configs.append(
            ProviderConfig(
                provider_config_id=config_id,
                provider=spec.provider,
                allowed_models=allowed_models,
                budgets=budgets,
                rate_limit=rate_limit,
            )
        )
    return tuple(configs)


def _allowed_models(models: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """None (every model) for an omitted list or one holding "*"; else the models."""
    if models is None or "*" in models:
        return None
    return tuple(dict.fromkeys(models))


def _settled_configs(configs: Iterable[ProviderConfig]) -> tuple[ProviderConfig, ...]:
    return tuple(
        msgspec.structs.replace(c, budgets=settled(c.budgets)) for c in configs
    )
