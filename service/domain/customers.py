"""The customer aggregate: its state, how events change it, what commands decide."""

from __future__ import annotations

from collections.abc import Iterable
from functools import reduce
from typing import assert_never

import msgspec

from service.domain.budgets import new_budgets
from service.domain.commands import (
    CreateCustomer,
    DeleteCustomer,
    UpdateCustomer,
    checked_name,
    id_source,
    rate_limit_after,
    rate_limit_of,
    replaced_budgets,
    settled,
)
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerEvent,
    CustomerUpdated,
    RateLimit,
)
from service.errors import NotFound, VersionConflict

CustomerCommand = CreateCustomer | UpdateCustomer | DeleteCustomer


class Customer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None


def evolve(customer: Customer | None, event: AnyEvent) -> Customer | None:
    """The customer after `event`; events of other aggregates leave it as it is."""
    match event:
        case CustomerCreated():
            return Customer(
                id=event.customer_id,
                name=event.name,
                budgets=settled(event.budgets),
                rate_limit=event.rate_limit,
            )
        case CustomerUpdated() if customer is not None:
            return msgspec.structs.replace(
                customer, name=event.name, rate_limit=event.rate_limit
            )
        case CustomerBudgetsReplaced() if customer is not None:
            return msgspec.structs.replace(customer, budgets=settled(event.budgets))
        case CustomerDeleted():
            return None
        case _:
            return customer


def fold(events: Iterable[AnyEvent]) -> Customer | None:
    return reduce(evolve, events, None)


def decide(command: CustomerCommand, customer: Customer | None) -> list[CustomerEvent]:
    match command:
        case CreateCustomer(customer_id=customer_id, body=body):
            if customer is not None:
                raise VersionConflict(f"customer {customer_id} already exists")
            return [
                CustomerCreated(
                    customer_id=customer_id,
                    name=checked_name(body.name, "customer"),
                    rate_limit=rate_limit_of(body.rate_limit),
                    budgets=new_budgets(body.budgets, id_source(command.new_ids)),
                )
            ]
        case UpdateCustomer(customer_id=customer_id):
            if customer is None:
                raise NotFound(f"customer {customer_id} does not exist")
            return _updated(customer, command)
        case DeleteCustomer(customer_id=customer_id):
            if customer is None:
                raise NotFound(f"customer {customer_id} does not exist")
            return [CustomerDeleted(customer_id=customer_id)]
        case _:
            assert_never(command)


def _updated(customer: Customer, command: UpdateCustomer) -> list[CustomerEvent]:
    changes = command.changes
    name = customer.name
    if not isinstance(changes.name, msgspec.UnsetType):
        name = checked_name(changes.name, "customer")
    rate_limit = rate_limit_after(customer.rate_limit, changes.rate_limit)
    budgets = replaced_budgets(
        customer.budgets, changes.budgets, id_source(command.new_ids)
    )
    events: list[CustomerEvent] = []
    if (name, rate_limit) != (customer.name, customer.rate_limit):
        events.append(
            CustomerUpdated(customer_id=customer.id, name=name, rate_limit=rate_limit)
        )
    if budgets is not None:
        events.append(CustomerBudgetsReplaced(customer_id=customer.id, budgets=budgets))
    return events
