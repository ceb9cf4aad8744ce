"""GET /api/governance/*: customers, teams, virtual keys and budgets from the read
model as their answers (`service.web.answers`), after waiting for ?min_position= when
asked."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from aiohttp import web

from projections import governance_reads as read_model
from projections.governance_usage import OWNER_TYPES, Owner
from projections.runner import Projector
from service.domain.bounds import id_or_none
from service.errors import Invalid, InvalidPosition
from service.eventstore import Connection
from service.web.answers import (
    BudgetList,
    CustomerFound,
    CustomerList,
    TeamFound,
    TeamList,
    VirtualKeyFound,
    VirtualKeyList,
)
from service.web.http import Right, json_response, path_id, query_int, query_value
from service.web.keys import (
    governance_projector_key,
    pool_key,
    readings_key,
    settings_key,
)

T = TypeVar("T")


async def wait_for_min_position(
    request: web.Request,
    follower: web.AppKey[Projector] = governance_projector_key,
) -> None:
    """Return once the projection `follower` names (by default the read model's)
    has applied ?min_position= (at once without it)."""
    try:
        position = query_int(request, "min_position")
    except Invalid as exc:
        raise InvalidPosition(exc.message) from None
    if position is not None:
        await request.app[follower].wait_for(
            position, request.app[settings_key].min_position_wait_s
        )


async def _read(
    request: web.Request,
    query: Callable[[Connection, datetime], Awaitable[T]],
    at_once: Callable[[Connection, datetime], Awaitable[T | None]] | None = None,
) -> T:
    """Run `query` on one snapshot of the read model, once it reached min_position:
    in a read-only transaction, unless `at_once` (one statement, one snapshot
    without a transaction) answers first."""
    await wait_for_min_position(request)
    async with request.app[pool_key].acquire() as conn:
        now = datetime.now(UTC)
        if at_once is not None and (found := await at_once(conn, now)) is not None:
            return found
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await query(conn, now)


def _query_id(request: web.Request, name: str) -> str | None:
    raw = query_value(request, name)
    if not raw:
        return None
    found = id_or_none(raw)
    if found is None:
        raise Invalid(f"query parameter {name} must be a UUID, got {raw[:100]!r}")
    return found


def _page(request: web.Request) -> read_model.Page:
    """?limit= (at least 1) and ?offset= of a list; without them, every match."""
    return read_model.Page(
        query_int(request, "limit", minimum=1), query_int(request, "offset", 0) or 0
    )


async def list_customers(request: web.Request) -> web.Response:
    page = _page(request)
    customers = await _read(
        request, lambda conn, now: read_model.list_customers(conn, now, page)
    )
    return json_response(CustomerList(customers=customers))


async def get_customer(request: web.Request) -> web.Response:
    customer_id = path_id(request, "customer")
    customer = await _read(
        request, lambda conn, now: read_model.fetch_customer(conn, customer_id, now)
    )
    return json_response(CustomerFound(customer=customer))


async def list_teams(request: web.Request) -> web.Response:
    customer_id = _query_id(request, "customer_id")
    page = _page(request)
    teams = await _read(
        request, lambda conn, now: read_model.list_teams(conn, now, customer_id, page)
    )
    return json_response(TeamList(teams=teams))


async def get_team(request: web.Request) -> web.Response:
    team_id = path_id(request, "team")
    team = await _read(
        request, lambda conn, now: read_model.fetch_team(conn, team_id, now)
    )
    return json_response(TeamFound(team=team))


async def list_virtual_keys(request: web.Request) -> web.Response:
    team_id = _query_id(request, "team_id")
    customer_id = _query_id(request, "customer_id")
    page = _page(request)
    keys = await _read(
        request,
        lambda conn, now: read_model.list_virtual_keys(
            conn, now, team_id, customer_id, page
        ),
    )
    return json_response(VirtualKeyList(virtual_keys=keys))


async def get_virtual_key(request: web.Request) -> web.Response:
    key_id = path_id(request, "virtual key")
    key = await _read(
        request, lambda conn, now: read_model.fetch_virtual_key(conn, key_id, now)
    )
    return json_response(VirtualKeyFound(virtual_key=key))


async def list_budgets(request: web.Request) -> web.Response:
    owner_type = query_value(request, "owner_type") or None
    if owner_type is not None and owner_type not in OWNER_TYPES:
        raise Invalid(
            f"query parameter owner_type must be one of {', '.join(OWNER_TYPES)},"
            f" got {owner_type!r}"
        )
    owner_id = _query_id(request, "owner_id")
    page = _page(request)
    if owner_type is None or owner_id is None:
        budgets = await _read(
            request,
            lambda conn, now: read_model.list_budgets(
                conn, now, owner_type, owner_id, page=page
            ),
        )
        return json_response(BudgetList(budgets=budgets))
    # One owner's: the most common read of a gateway, in one round trip when the
    # reading asks for what it asked last time.
    owner = Owner(owner_type, owner_id)
    remembered = request.app[readings_key]
    budgets = await _read(
        request,
        lambda conn, now: read_model.list_budgets(
            conn, now, owner_type, owner_id, remembered, page
        ),
        lambda conn, now: read_model.owner_budgets_at_once(
            conn, now, owner, remembered, page
        ),
    )
    return json_response(BudgetList(budgets=budgets))


ROUTES = [
    ("GET", "/api/governance/customers", list_customers, Right.READ),
    ("GET", "/api/governance/customers/{id}", get_customer, Right.READ),
    ("GET", "/api/governance/teams", list_teams, Right.READ),
    ("GET", "/api/governance/teams/{id}", get_team, Right.READ),
    ("GET", "/api/governance/virtual-keys", list_virtual_keys, Right.READ),
    ("GET", "/api/governance/virtual-keys/{id}", get_virtual_key, Right.READ),
    ("GET", "/api/governance/budgets", list_budgets, Right.READ),
]
